"""The command line: a smoke run of every verb on a tiny model, and clear errors for bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from alphatune.cli import main


@pytest.fixture(scope="module")
def e2e_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("e2e")
    rows = [
        ("name[Aromi], eatType[pub]", "Aromi is a pub."),
        ("name[Aromi], eatType[pub]", "There is a pub called Aromi."),
        ("name[Cotto], food[Indian]", "Cotto serves Indian food."),
        ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."),
    ]
    for split in ("train", "test"):
        with open(path / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["mr", "ref"])
            writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("cli") / "base"
    code = main(
        [
            "quantize",
            "--model",
            str(tiny_model_dir),
            "--bits",
            "3",
            "--group-size",
            "32",
            "--method",
            "offset",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_quantize_writes_a_base(base_dir):
    config = json.loads((base_dir / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 3 and config["group_size"] == 32 and len(config["layers"]) == 14
    assert (base_dir / "model.safetensors").exists() and (
        base_dir / "tokenizer_config.json"
    ).exists()


def test_tune_evaluate_generate(base_dir, e2e_files, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert (
        main(
            [
                "tune",
                "--base",
                str(base_dir),
                "--data",
                str(e2e_files / "train.csv"),
                "--eval-data",
                str(e2e_files / "train.csv"),
                "--eval-limit",
                "2",
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--output",
                str(adapter),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (adapter / "adapter.safetensors").exists()
    assert "trainable parameters" in capsys.readouterr().out
    # The adapter records its task, the base's bits and fingerprint, the training and its metrics.
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["bits"] == [3] and len(recorded["base_fingerprint"]) > 8
    assert recorded["metadata"]["task"] == "e2e"
    assert recorded["metadata"]["train"]["max_steps"] == 2
    metrics = recorded["metadata"]["metrics"]
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] > 0 and metrics["seconds"] >= 0
    assert (
        main(
            [
                "evaluate",
                "--base",
                str(base_dir),
                "--adapter",
                str(adapter),
                "--data",
                str(e2e_files / "test.csv"),
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "BLEU on 2 inputs" in capsys.readouterr().out
    assert (
        main(
            [
                "generate",
                "--base",
                str(base_dir),
                "--adapter",
                str(adapter),
                "--prompt",
                "name[Aromi]",
                "--max-new-tokens",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "name[Aromi]" in capsys.readouterr().out


def test_tune_refuses_to_overwrite_an_adapter(base_dir, e2e_files, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "keep.txt").write_text("mine")
    code = main(
        [
            "tune",
            "--base",
            str(base_dir),
            "--data",
            str(e2e_files / "train.csv"),
            "--max-steps",
            "1",
            "--output",
            str(adapter),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "--resume" in capsys.readouterr().err
    assert (adapter / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["quantize", "--bits", "0", "--output", "x"], "bits must be 1..8"),
        (["quantize", "--bits", "three", "--output", "x"], "bits must be an integer"),
        (["quantize", "--group-size", "-4", "--output", "x"], "group size must be positive"),
        (
            ["tune", "--base", "/no/such/base", "--output", "x"],
            "directory not found: /no/such/base",
        ),
        (["evaluate", "--base", ".", "--data", "/no/such.csv"], "file not found: /no/such.csv"),
        (["quantize", "--layer-bits", "*.down_proj", "--output", "x"], "expected PATTERN=BITS"),
        (["quantize", "--layer-bits", "*.down_proj=9", "--output", "x"], "bits must be 1..8"),
        (["quantize", "--hessian-precision", "half", "--output", "x"], "invalid choice: 'half'"),
        (
            ["quantize", "--calibration-pairs", "books:/no/such.txt", "--output", "x"],
            "expected TASK:FILE with TASK one of e2e, triples, webnlg",
        ),
        (
            ["quantize", "--calibration-pairs", "e2e:/no/such.csv", "--output", "x"],
            "file not found: /no/such.csv",
        ),
    ],
    ids=[
        "bits=0",
        "bits=text",
        "group=-4",
        "missing-base",
        "missing-data",
        "layer-bits-no-bits",
        "layer-bits=9",
        "hessian-precision=half",
        "calibration-pairs-task",
        "calibration-pairs-file",
    ],
)
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_quantize_with_mixed_precision(tiny_model_dir, tmp_path):
    out = tmp_path / "mixed"
    argv = ["quantize", "--model", str(tiny_model_dir), "--group-size", "32", "--method", "offset"]
    argv += ["--layer-bits", "*.down_proj=4", "--layer-bits", "*.layers.0.*=2"]
    assert main([*argv, "--output", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["layer_bits"] == [["*.down_proj", 4], ["*.layers.0.*", 2]]
    bits = {name: spec["bits"] for name, spec in config["layers"].items()}
    assert bits["model.layers.0.mlp.down_proj"] == 4  # the first match wins
    assert bits["model.layers.0.self_attn.q_proj"] == 2
    assert bits["model.layers.1.self_attn.q_proj"] == 3


def test_group_size_that_does_not_divide(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "quantize",
            "--model",
            str(tiny_model_dir),
            "--group-size",
            "48",
            "--method",
            "offset",
            "--output",
            str(tmp_path / "b"),
            "--no-progress",
        ]
    )
    assert code == 2
    out = capsys.readouterr().err
    assert "group_size 48 does not divide in_features=64" in out and "choose one of" in out
    assert not (tmp_path / "b").exists()


def test_loading_something_that_is_not_a_base(tiny_model_dir, capsys):
    code = main(["evaluate", "--base", str(tiny_model_dir), "--limit", "1", "--no-progress"])
    assert code == 2
    assert "no alphatune quantization_config" in capsys.readouterr().err


def test_help_for_every_command(capsys):
    for command in ("quantize", "tune", "generate", "evaluate", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--bits" in capsys.readouterr().out


def test_generate_with_an_adapter_per_prompt(base_dir, tmp_path, capsys):
    from alphatune import AlphaTuningConfig, prepare_for_alphatuning
    from alphatune.adapters import load_quantized, save_adapter

    model, _ = load_quantized(base_dir)
    prepare_for_alphatuning(model)
    for name, factor in (("a", 1.3), ("b", 0.7)):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(factor)
        save_adapter(model, tmp_path / name, AlphaTuningConfig())
    prompts = ["name[Aromi]", "name[Cotto], food[Indian]"]
    options = ["--max-new-tokens", "3", "--no-progress"]

    def answers(argv: list[str]) -> list[str]:
        assert main(["generate", "--base", str(base_dir), *argv, *options]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("→")]

    single = [
        answers(["--adapter", str(tmp_path / n), "--prompt", p])[0]
        for n, p in zip("ab", prompts, strict=True)
    ]
    mixed = answers(
        [
            "--adapter",
            f"a={tmp_path / 'a'}",
            "--adapter",
            f"b={tmp_path / 'b'}",
            "--prompt",
            prompts[0],
            "--prompt-adapter",
            "a",
            "--prompt",
            prompts[1],
            "--prompt-adapter",
            "b",
        ]
    )
    assert mixed == single
    code = main(
        [
            "generate",
            "--base",
            str(base_dir),
            "--adapter",
            f"a={tmp_path / 'a'}",
            "--prompt",
            "x",
            *options,
        ]
    )
    assert code == 2 and "one --prompt-adapter NAME per --prompt" in capsys.readouterr().err


def test_quantize_passes_the_hessian_precision_on(tiny_model_dir, tmp_path, monkeypatch):
    import alphatune.quantize

    seen = []
    real = alphatune.quantize.quantize_

    def spy(*args, **kwargs):
        seen.append(kwargs["hessian_precision"])
        return real(*args, **kwargs)

    monkeypatch.setattr(alphatune.quantize, "quantize_", spy)
    argv = ["quantize", "--model", str(tiny_model_dir), "--group-size", "32", "--method", "offset"]
    argv += ["--hessian-precision", "float32", "--output", str(tmp_path / "b"), "--no-progress"]
    assert main(argv) == 0
    assert seen == ["float32"]


def test_quantize_calibrates_on_text_and_training_pairs(tiny_model_dir, tmp_path, e2e_files):
    """``--calibration-pairs``: the calibrated method reads the text file's rows, then
    ``--pair-share`` of the rows from the training pairs (``mixed_calibration``)."""
    import alphatune.quantize
    from alphatune.data import load_e2e_train, mixed_calibration
    from alphatune.models import load_tokenizer

    seen = []
    real = alphatune.quantize.quantize_

    def spy(*args, **kwargs):
        seen.append(kwargs["calibration"])
        return real(*args, **kwargs)

    text = tmp_path / "text.txt"
    text.write_text("A pub by the river serves Indian food. " * 100, encoding="utf-8")
    train = e2e_files / "train.csv"
    argv = ["quantize", "--model", str(tiny_model_dir), "--group-size", "32"]
    argv += ["--calibration", str(text), "--calibration-sequences", "4"]
    argv += ["--calibration-length", "16", "--calibration-pairs", f"e2e:{train}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(alphatune.quantize, "quantize_", spy)
        assert main([*argv, "--pair-share", "0.25", "--output", str(tmp_path / "b")]) == 0
    tokenizer = load_tokenizer(tiny_model_dir)
    pairs = [load_e2e_train(train)]
    expected = mixed_calibration(tokenizer, text, pairs, 4, 16, pair_share=0.25)
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    assert (tmp_path / "b" / "config.json").exists()


def test_calibration_pairs_need_the_calibrated_method(tiny_model_dir, tmp_path, e2e_files, capsys):
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "offset", "--group-size", "32"]
    argv += [
        "--calibration-pairs",
        f"e2e:{e2e_files / 'train.csv'}",
        "--output",
        str(tmp_path / "b"),
    ]
    assert main([*argv, "--no-progress"]) == 2
    assert "--calibration-pairs needs --method calibrated" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    argv = ["quantize", "--model", str(tiny_model_dir), "--pair-share", "0.5"]
    assert main([*argv, "--output", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "--pair-share is the share of --calibration-pairs" in capsys.readouterr().err
