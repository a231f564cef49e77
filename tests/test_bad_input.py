"""Bad input, as a hostile but realistic user gives it: every case is a clear error (exit code 2,
the message names the file or field) and leaves the user's files byte-identical; the inputs that
already worked keep working. One tiny Llama, quantized and tuned once for the module."""

from __future__ import annotations

import csv
import importlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from sealing import reseal_base
from tiny_models import make_tiny_llama
from torch.optim.optimizer import register_optimizer_step_post_hook

from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    ConfigError,
    DataError,
    TrainConfig,
    prepare_for_alphatuning,
    quantize_,
)
from alphatune.adapters import ADAPTER_WEIGHTS, BASE_WEIGHTS, load_quantized, save_quantized
from alphatune.cli import main
from alphatune.data import Example, load_e2e_train
from alphatune.errors import TrainingError
from alphatune.files import (
    CHECKPOINT_DIR,
    CHECKPOINT_STATE,
    CHECKPOINT_TENSORS,
    INTEGRITY,
    seal,
    write_file,
)
from alphatune.train import train

UNWRITABLE = Path("/proc/alphatune-no-such-dir/out")  # /proc refuses new entries, even to root


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def cli(capsys, *argv: object) -> tuple[int, str]:
    """Run the command line; returns the exit code and everything it printed."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse errors
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def copy_of(directory: Path, target: Path) -> Path:
    shutil.copytree(directory, target)
    return target


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.unlink()  # a new file: a loaded tensor may map the old one's pages
    path.write_bytes(bytes(data))


def tensor_offset(path: Path, name: str) -> int:
    """Where tensor ``name``'s bytes start in a safetensors file."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    return 8 + header_length + header[name]["data_offsets"][0]


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command gets as far as loading a model or training."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started working before checking its inputs")

    monkeypatch.setattr("alphatune.models.load_model", refuse)
    monkeypatch.setattr("alphatune.bases.load_quantized", refuse)
    # The module by name: the package face exports the function ``train`` under the same name.
    monkeypatch.setattr(importlib.import_module("alphatune.train"), "train", refuse)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def model_dir(work, tiny_model_dir):
    """The user's own fp32 model folder (a copy: the session's fixture must stay untouched)."""
    return copy_of(tiny_model_dir, work / "my-model")


@pytest.fixture(scope="module")
def e2e(work):
    path = work / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows([("name[Aromi]", "Aromi is a pub."), ("name[Cotto]", "Cotto is fine.")])
    return path


@pytest.fixture(scope="module")
def base(work, model_dir):
    out = work / "base"
    argv = ["quantize", "--model", model_dir, "--group-size", "32", "--method", "offset"]
    assert main([str(a) for a in [*argv, "--output", out, "--no-progress"]]) == 0
    return out


def tune_argv(base: Path, data: Path, output: Path, *extra: object) -> list[object]:
    return [
        "tune", "--base", base, "--data", data, "--max-steps", "2", "--batch-size", "2",
        "--checkpoint-every", "1", "--output", output, "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(work, base, e2e):
    out = work / "adapter"
    assert main([str(a) for a in tune_argv(base, e2e, out)]) == 0
    return out


# ---------------------------------------------------------------- 1-3: data loss
@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_quantize_never_writes_into_or_around_its_input(capsys, model_dir, where, no_work):
    output = {"same": model_dir, "inside": model_dir / "q", "around": model_dir.parent}[where]
    before = snapshot(model_dir)
    code, out = cli(capsys, "quantize", "--model", model_dir, "--output", output, "--overwrite")
    assert code == 2 and f"the input {model_dir}" in out
    assert snapshot(model_dir) == before


def test_overwrite_refuses_a_folder_alphatune_did_not_write(capsys, work, model_dir, no_work):
    foreign = copy_of(model_dir, work / "someone-elses-model")  # config.json + model.safetensors
    (foreign / "notes.txt").write_text("mine")
    before = snapshot(foreign)
    code, out = cli(capsys, "quantize", "--output", foreign, "--overwrite")
    assert code == 2 and f"{foreign} is not empty and was not written by alphatune" in out
    code, out = cli(capsys, "tune", "--base", ".", "--output", foreign, "--overwrite")
    assert code == 2 and "not written by alphatune" in out
    assert snapshot(foreign) == before


def test_overwrite_refuses_another_kind_of_alphatune_folder(capsys, adapter, no_work):
    before = snapshot(adapter)
    code, out = cli(capsys, "quantize", "--output", adapter, "--overwrite")
    assert (
        code == 2
        and f"{adapter} holds an alphatune adapter, not an alphatune quantized base" in out
    )
    assert snapshot(adapter) == before


def test_predictions_never_replace_a_file_silently(capsys, work, base, e2e, monkeypatch):
    predictions = work / "predictions.txt"
    predictions.write_text("my earlier results\n")
    evaluate = ["evaluate", "--base", base, "--data", e2e, "--limit", "1", "--max-new-tokens", "2"]
    with monkeypatch.context() as patch:
        patch.setattr("alphatune.adapters.load_quantized", lambda *a: pytest.fail("loaded"))
        code, out = cli(capsys, *evaluate, "--predictions", predictions, "--no-progress")
        assert code == 2 and f"{predictions} exists" in out and "--overwrite" in out
        assert predictions.read_text() == "my earlier results\n"
        # Not even with --overwrite may the predictions replace an input.
        before = snapshot(e2e)
        code, out = cli(capsys, *evaluate, "--predictions", e2e, "--overwrite", "--no-progress")
        assert code == 2 and "input" in out and snapshot(e2e) == before
    code, _ = cli(capsys, *evaluate, "--predictions", predictions, "--overwrite", "--no-progress")
    assert code == 0 and predictions.read_text() != "my earlier results\n"
    assert sorted(p.name for p in work.glob(".predictions*")) == []  # no temporary file left


# ---------------------------------------------------------------- 4-6: corrupted files
def test_a_flipped_scale_or_tokenizer_byte_is_named(capsys, work, base):
    scale = "model.layers.0.self_attn.q_proj.alpha_rest"
    corrupt = copy_of(base, work / "corrupt-scale")
    flip_byte(corrupt / BASE_WEIGHTS, tensor_offset(corrupt / BASE_WEIGHTS, scale) + 1)
    code, out = cli(capsys, "generate", "--base", corrupt, "--prompt", "x", "--no-progress")
    assert code == 2 and f"{corrupt / BASE_WEIGHTS}: tensor '{scale}' does not match" in out
    corrupt = copy_of(base, work / "corrupt-tokenizer")
    flip_byte(corrupt / "tokenizer.json", 1000)
    code, out = cli(capsys, "generate", "--base", corrupt, "--prompt", "x", "--no-progress")
    assert code == 2 and f"{corrupt / 'tokenizer.json'} does not match the hash" in out


def test_a_flipped_adapter_byte_is_named(capsys, work, base, adapter):
    corrupt = copy_of(adapter, work / "corrupt-adapter")
    weights = corrupt / ADAPTER_WEIGHTS
    flip_byte(weights, len(weights.read_bytes()) - 3)
    argv = ["generate", "--base", base, "--adapter", corrupt, "--prompt", "x", "--no-progress"]
    code, out = cli(capsys, *argv)
    assert code == 2 and f"{weights}: tensor" in out and "does not match the hash" in out


def test_a_flipped_checkpoint_byte_stops_the_resume(capsys, work, base, e2e, adapter):
    run = copy_of(adapter, work / "corrupt-run")
    tensors = run / CHECKPOINT_DIR / CHECKPOINT_TENSORS
    flip_byte(tensors, len(tensors.read_bytes()) - 3)
    before = snapshot(run)
    code, out = cli(capsys, *tune_argv(base, e2e, run, "--resume"))
    assert code == 2 and f"{tensors}: tensor" in out
    assert snapshot(run) == before


# ---------------------------------------------------------------- 7: non-finite training
@pytest.mark.parametrize(
    "option,value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--alpha-lr-scale", "inf")]
)
def test_non_finite_rates_are_refused_at_once(capsys, option, value, no_work):
    code, out = cli(capsys, "tune", "--base", ".", "--output", "x", option, value)
    assert code == 2 and option in out and value in out


@pytest.mark.parametrize(
    "make",
    [
        lambda: TrainConfig(learning_rate=math.inf),
        lambda: TrainConfig(learning_rate=math.nan),
        lambda: TrainConfig(max_grad_norm=math.inf),
        lambda: AlphaTuningConfig(alpha_lr_scale=math.inf),
    ],
    ids=["lr=inf", "lr=nan", "grad-norm=inf", "alpha-lr-scale=inf"],
)
def test_non_finite_rates_are_refused_by_the_library(make):
    with pytest.raises(ConfigError, match="must be a finite number"):
        make()


EXAMPLES = [Example(prompt=f"Table: name[{n}]\nText:", target=f" {n} is a pub.") for n in "ABCD"]


@pytest.fixture
def tunable(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    quantize_(model, BCQConfig(bits=3, group_size=32, method="offset"))
    prepare_for_alphatuning(model)
    return model


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(capsys, work, base, e2e):
    run = work / "diverging"
    code, out = cli(capsys, *tune_argv(base, e2e, run, "--lr", "1e30", "--warmup-ratio", "0"))
    assert code == 2 and "training stopped at step 2: the loss is" in out
    assert f"the checkpoint of step 1 in {run / CHECKPOINT_DIR} is kept" in out
    assert not (run / ADAPTER_WEIGHTS).exists()  # no NaN adapter
    state = json.loads((run / CHECKPOINT_DIR / CHECKPOINT_STATE).read_text())
    assert state["step"] == 1


def test_non_finite_gradients_or_updates_stop_training(tokenizer, tunable, tmp_path):
    config = TrainConfig(max_steps=2, batch_size=2, checkpoint_every=0)
    first = next(p for p in tunable.parameters() if p.requires_grad)
    hook = first.register_hook(lambda grad: grad * math.nan)
    with pytest.raises(TrainingError, match="step 1: the gradient norm is nan"):
        train(tunable, tokenizer, EXAMPLES, config, progress=False)
    hook.remove()
    tunable.zero_grad(set_to_none=True)

    def poison(optimizer, args, kwargs):
        with torch.no_grad():
            first.fill_(math.inf)

    handle = register_optimizer_step_post_hook(poison)  # every optimizer, train()'s too
    try:
        with pytest.raises(TrainingError, match="the update made .*alpha1 NaN or infinite"):
            train(tunable, tokenizer, EXAMPLES, config, output_dir=tmp_path, progress=False)
    finally:
        handle.remove()
    assert not (tmp_path / CHECKPOINT_DIR).exists()


def test_a_rate_too_large_for_float32_is_a_config_error(tokenizer, tunable):
    config = TrainConfig(learning_rate=1e38, max_steps=1)
    with pytest.raises(ConfigError, match="too large to step float32"):
        train(tunable, tokenizer, EXAMPLES, config, AlphaTuningConfig(alpha_lr_scale=100))


# ---------------------------------------------------------------- 8: fail early
@pytest.mark.parametrize("command", ["quantize", "tune", "demo"])
def test_an_unwritable_output_is_found_before_any_work(capsys, command, base, e2e, no_work):
    argv = {
        "quantize": ["quantize", "--output", UNWRITABLE],
        "tune": ["tune", "--base", base, "--data", e2e, "--output", UNWRITABLE],
        "demo": ["demo", "--work-dir", UNWRITABLE],
    }[command]
    code, out = cli(capsys, *argv)
    assert code == 2 and "cannot write to" in out and str(UNWRITABLE) in out


def test_a_file_where_a_folder_is_expected(capsys, work, no_work):
    blocker = work / "a-file"
    blocker.write_text("x")
    code, out = cli(capsys, "quantize", "--output", blocker / "base")
    assert code == 2 and f"{blocker} is a file, where a directory is expected" in out
    code, out = cli(capsys, "quantize", "--output", blocker)
    assert code == 2 and f"{blocker} exists and is a file" in out
    assert blocker.read_text() == "x"


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def crash(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_file(target, crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]


# ---------------------------------------------------------------- 9: explained, not a traceback
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("bits", 0, "bits=0 (expected an integer 1..8)"),
        ("bits", 99, "bits=99 (expected an integer 1..8)"),
        ("group_size", 0, "group_size=0 (expected a positive integer)"),
        ("group_size", "abc", "group_size='abc' (expected a positive integer)"),
        ("bias", "yes", "bias='yes' (expected true or false)"),
    ],
)
def test_a_bad_layer_spec_names_layer_and_field(work, base, field, value, message):
    corrupt = copy_of(base, work / f"spec-{field}-{value}")
    layer = "model.layers.0.mlp.up_proj"

    def edit(config):
        config["quantization_config"]["layers"][layer][field] = value

    edit_json(corrupt / "config.json", edit)
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_quantized(corrupt)  # an edit is caught first as such
    reseal_base(corrupt)
    expected = f"config.json: layer {re.escape(repr(layer))} .*{re.escape(message)}"
    with pytest.raises(CheckpointError, match=expected):
        load_quantized(corrupt)


@pytest.mark.parametrize("value", [99, "abc", 2.5])
def test_a_bad_bits_in_quantization_config_is_named(work, base, value):
    corrupt = copy_of(base, work / f"qconfig-bits-{value}")
    edit_json(corrupt / "config.json", lambda c: c["quantization_config"].update(bits=value))
    reseal_base(corrupt)
    with pytest.raises(CheckpointError, match=r"config.json: quantization_config: bits must be"):
        load_quantized(corrupt)


def test_a_base_missing_its_tokenizer_file(capsys, work, base):
    corrupt = copy_of(base, work / "no-tokenizer-json")
    (corrupt / "tokenizer.json").unlink()
    code, out = cli(capsys, "generate", "--base", corrupt, "--prompt", "x", "--no-progress")
    assert code == 2 and f"{corrupt / 'tokenizer.json'} is missing" in out


def checkpoint_state_without_step(run: Path, sealed: bool) -> None:
    path = run / CHECKPOINT_DIR / CHECKPOINT_STATE
    state = json.loads(path.read_text())
    del state["step"]
    del state[INTEGRITY]
    if sealed:
        from safetensors.torch import load_file

        state = seal(state, (INTEGRITY,), load_file(run / CHECKPOINT_DIR / CHECKPOINT_TENSORS))
    path.write_text(json.dumps(state))


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "legacy"])
def test_a_checkpoint_without_step(capsys, work, base, e2e, adapter, sealed):
    run = copy_of(adapter, work / f"no-step-{sealed}")
    checkpoint_state_without_step(run, sealed)
    code, out = cli(capsys, *tune_argv(base, e2e, run, "--resume"))
    assert code == 2 and f"{run / CHECKPOINT_DIR / CHECKPOINT_STATE}: 'step' is None" in out


def test_pickle_weights_are_refused_with_a_reason(capsys, work, model_dir):
    pickled = work / "pickled-model"
    pickled.mkdir()
    shutil.copy(model_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle")
    before = snapshot(pickled)
    code, out = cli(capsys, "quantize", "--model", pickled, "--output", work / "from-pickle")
    assert code == 2 and "pytorch_model.bin" in out and "safetensors only" in out
    assert snapshot(pickled) == before and not (work / "from-pickle").exists()


def test_a_path_that_looks_like_markup_is_printed_as_is(capsys, work, base):
    odd = copy_of(base, work / "runs[" / "bold]" / "base")  # the path holds "[/bold]"
    code, out = cli(
        capsys, "generate", "--base", odd, "--prompt", "x", "--max-new-tokens", "1", "--no-progress"
    )
    assert code == 0 and "bold]" in out


def test_a_base_is_not_a_model_to_quantize(capsys, work, base):
    before = snapshot(base)
    code, out = cli(capsys, "quantize", "--model", base, "--output", work / "twice")
    assert code == 2 and f"{base} is an alphatune quantized base (already quantized)" in out
    assert snapshot(base) == before


def test_base_and_adapter_swapped_say_which_is_which(capsys, base, adapter):
    code, out = cli(capsys, "generate", "--base", adapter, "--prompt", "x", "--no-progress")
    assert code == 2 and f"{adapter} is an alphatune adapter, not a quantized base" in out
    argv = ["generate", "--base", base, "--adapter", base, "--prompt", "x", "--no-progress"]
    code, out = cli(capsys, *argv)
    assert code == 2 and f"{base} is an alphatune quantized base, not an adapter" in out


# ---------------------------------------------------------------- 10: smaller ones
def test_an_unclosed_quote_is_not_merged_silently(capsys, work, base):
    path = work / "unclosed.csv"
    path.write_text(
        'mr,ref\nname[A],A is a pub.\nname[B],"B is a pub.\nname[C],C is a pub.\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=rf"{path}:3: malformed CSV .*unclosed or stray quote"):
        load_e2e_train(path)
    code, out = cli(capsys, "tune", "--base", base, "--data", path, "--output", work / "never")
    assert code == 2 and f"{path}:3" in out and not (work / "never").exists()


def test_a_quote_that_closes_rows_later_is_caught(work):
    path = work / "merged.csv"
    path.write_text(
        'mr,ref\nname[A],"A is a pub.\nname[B],B is a pub.\nname[C],C is" nice\n', encoding="utf-8"
    )
    with pytest.raises(DataError, match=rf"{path}:2"):
        load_e2e_train(path)


def test_the_non_utf8_error_names_the_right_line(work):
    path = work / "latin1.csv"
    rows = "".join(f"name[R{i}],Restaurant {i} is a pub.\n" for i in range(2000))
    path.write_bytes(b"mr,ref\n" + rows.encode() + b"name[Caf\xe9],Caf\xe9 is a pub.\n")
    with pytest.raises(DataError, match=rf"{path}: not UTF-8 text \(line 2002, byte"):
        load_e2e_train(path)


def test_a_prompt_longer_than_the_context_is_refused(capsys, base):
    prompt = "word " * 300  # the tiny model has 256 positions
    argv = ["generate", "--base", base, "--task", "raw", "--prompt", prompt, "--no-progress"]
    code, out = cli(capsys, *argv)
    assert code == 2 and re.search(r"prompt 0 has \d+ tokens", out) and "context of 256" in out


def test_a_perplexity_window_longer_than_the_context_is_refused(capsys, base, e2e):
    argv = ["evaluate", "--base", base, "--perplexity", e2e, "--context", "1000", "--no-progress"]
    code, out = cli(capsys, *argv)
    assert code == 2 and "--context 1000 is longer than the model's context of 256" in out


def test_demo_checks_its_settings_before_quantizing(capsys, no_work):
    code, out = cli(capsys, "demo", "--lr", "-1")
    assert code == 2 and "--lr" in out and "positive" in out


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: BCQConfig(iterations="abc"), "iterations"),
        (lambda: BCQConfig(include=5), "module patterns"),
        (lambda: TrainConfig(batch_size=2.5), "batch_size"),
        (lambda: TrainConfig(max_steps="10"), "max_steps"),
        (lambda: TrainConfig(dropout="no"), "dropout"),
        (lambda: AlphaTuningConfig(train_offset="yes"), "train_offset"),
    ],
    ids=["iterations", "include", "batch_size", "max_steps", "dropout", "train_offset"],
)
def test_wrong_types_in_configs_are_config_errors(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


# ---------------------------------------------------------------- what already worked
def test_a_truncated_base_is_named(capsys, work, base):
    corrupt = copy_of(base, work / "truncated")
    weights = corrupt / BASE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1000])
    code, out = cli(capsys, "generate", "--base", corrupt, "--prompt", "x", "--no-progress")
    assert code == 2 and f"{weights} cannot be read" in out


def test_an_adapter_of_another_base_is_refused(capsys, work, tokenizer, adapter):
    other = work / "other-base"
    model = make_tiny_llama(len(tokenizer), seed=3)
    quantize_(model, BCQConfig(bits=3, group_size=32, method="offset"))
    save_quantized(model, other, BCQConfig(bits=3, group_size=32), tokenizer)
    argv = ["generate", "--base", other, "--adapter", adapter, "--prompt", "x", "--no-progress"]
    code, out = cli(capsys, *argv)
    assert code == 2 and "adapter was tuned on base" in out


def test_overwrite_of_our_own_base_still_works(capsys, work, base):
    again = copy_of(base, work / "again")
    (again / "my-notes.txt").write_text("kept")
    argv = ["quantize", "--model", work / "my-model", "--group-size", "32", "--method", "offset"]
    code, _ = cli(capsys, *argv, "--output", again, "--overwrite", "--no-progress")
    assert code == 0 and (again / "my-notes.txt").read_text() == "kept"
    load_quantized(again)


def test_resume_without_a_checkpoint_and_a_missing_column(capsys, work, base, e2e):
    code, out = cli(capsys, *tune_argv(base, e2e, work / "empty-run", "--resume"))
    assert code == 2 and "nothing to resume" in out
    bad = work / "columns.csv"
    bad.write_text("mr,text\nname[A],hello\n", encoding="utf-8")
    code, out = cli(capsys, "tune", "--base", base, "--data", bad, "--output", work / "never")
    assert code == 2 and f"{bad}: missing column(s) ref" in out
