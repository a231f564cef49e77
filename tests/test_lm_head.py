"""The LM head options (keep / bf16 / bcq): logits, untying, save/load, tuning, errors, CLI.

These run with ``embedding="keep"`` (the fp32 embedding of the head options before the compact
default); the compact embedding and head are tested in ``test_embedding.py``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from sealing import reseal_base
from tiny_models import VOCAB, logits, make_tiny_llama, quantized_tiny_llama, sqnr_db
from torch import nn

from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    ConfigError,
    UnsupportedModelError,
    prepare_for_alphatuning,
    quantize_,
    quantize_lm_head,
)
from alphatune.adapters import (
    BASE_WEIGHTS,
    base_fingerprint,
    head_fingerprint,
    load_adapter,
    load_quantized,
    save_adapter,
    save_quantized,
)
from alphatune.files import NEWEST_BASE_FORMAT
from alphatune.layers import BCQLinear
from alphatune.lm_head import BF16Linear, collect_head_hessian, replaced_head
from alphatune.quantize import summarize
from alphatune.tuning import trainable_state

CALIBRATION = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


@pytest.fixture(scope="module")
def tied_base() -> nn.Module:
    return make_tiny_llama(VOCAB)


@pytest.fixture
def tied(tied_base: nn.Module) -> nn.Module:
    return copy.deepcopy(tied_base)


def quantized(head: str, method: str = "offset", **kwargs) -> nn.Module:
    kwargs.setdefault("embedding", "keep")
    calibration = CALIBRATION if method == "calibrated" else None
    return quantized_tiny_llama(calibration, method=method, lm_head=head, **kwargs)


def test_bf16_head_is_close_to_the_fp32_head_and_unties_the_embedding(tied: nn.Module) -> None:
    embedding = tied.get_input_embeddings().weight
    before = embedding.detach().clone()
    assert tied.lm_head.weight is embedding
    reference = logits(tied)

    record = quantize_lm_head(tied, BCQConfig(lm_head="bf16", embedding="keep"))

    assert record is not None and record.mode == "bf16" and record.untied
    assert isinstance(tied.lm_head, BF16Linear) and tied.lm_head.weight.dtype == torch.bfloat16
    out = logits(tied)
    assert out.dtype == torch.float32
    # bf16 keeps 8 significant bits of the weights and of the hidden states.
    torch.testing.assert_close(out, reference, rtol=0.02, atol=0.02)
    # The embedding is the same fp32 tensor, unchanged, and no longer shared with the head.
    assert tied.get_input_embeddings().weight is embedding and embedding.dtype == torch.float32
    assert torch.equal(embedding, before)
    assert tied.config.tie_word_embeddings is False
    tied.tie_weights()  # must not put the embedding back into the head
    assert tied.lm_head.weight.dtype == torch.bfloat16


def test_untied_model_keeps_its_embedding(llama_base: nn.Module) -> None:
    model = copy.deepcopy(llama_base)
    embedding = model.get_input_embeddings().weight.detach().clone()
    record = quantize_lm_head(model, BCQConfig(lm_head="bf16", embedding="keep"))
    assert record is not None and not record.untied
    assert torch.equal(model.get_input_embeddings().weight, embedding)


@pytest.mark.parametrize("method", ["offset", "calibrated"])
def test_bcq_head_more_bits_are_closer(tied_base: nn.Module, method: str) -> None:
    reference = logits(tied_base)
    errors = {}
    for bits in (2, 4, 8):
        model = copy.deepcopy(tied_base)
        config = BCQConfig(
            group_size=32, method=method, lm_head="bcq", lm_head_bits=bits, embedding="keep"
        )
        quantize_lm_head(model, config, calibration=CALIBRATION)
        assert isinstance(model.lm_head, BCQLinear) and model.lm_head.bits == bits
        assert torch.equal(model.get_input_embeddings().weight, tied_base.lm_head.weight)
        errors[bits] = sqnr_db(reference, logits(model))
    assert errors[2] < errors[4] < errors[8]
    assert errors[8] > 35


def test_hessian_reuse_gives_the_same_head(tied_base: nn.Module) -> None:
    config = BCQConfig(group_size=32, lm_head="bcq", embedding="keep")
    a, b = copy.deepcopy(tied_base), copy.deepcopy(tied_base)
    quantize_lm_head(a, config, calibration=CALIBRATION)
    quantize_lm_head(b, config, hessian=collect_head_hessian(tied_base, CALIBRATION))
    assert torch.equal(a.lm_head.packed_codes, b.lm_head.packed_codes)


def test_keep_changes_nothing(tied: nn.Module) -> None:
    assert quantize_lm_head(tied, BCQConfig(lm_head="keep", embedding="keep")) is None
    assert type(tied.lm_head) is nn.Linear and replaced_head(tied) is None
    assert type(tied.get_input_embeddings()) is nn.Embedding
    assert tied.lm_head.weight is tied.get_input_embeddings().weight


@pytest.mark.parametrize("head", ["bf16", "bcq"])
@pytest.mark.parametrize("method", ["offset", "calibrated"])
def test_round_trip_is_bit_exact(head: str, method: str, tmp_path) -> None:
    model = quantized(head, method)
    save_quantized(model, tmp_path / "base", BCQConfig(bits=3, group_size=32, method=method))
    loaded, _ = load_quantized(tmp_path / "base")

    assert torch.equal(logits(model), logits(loaded))
    assert type(loaded.lm_head) is type(model.lm_head)
    assert replaced_head(loaded) == replaced_head(model)
    assert base_fingerprint(loaded) == base_fingerprint(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert config["tie_word_embeddings"] is False
    assert qconfig["lm_head"] == head and qconfig["format_version"] == 2
    assert qconfig["head"]["module"] == "lm_head" and qconfig["head"]["untied"] is True
    assert qconfig["head"]["fingerprint"] == head_fingerprint(model)
    assert (qconfig["head"]["fingerprint"] is None) == (head == "bf16")


def test_head_is_stored_compactly(tmp_path) -> None:
    from safetensors import safe_open

    for head in ("bf16", "bcq"):
        save_quantized(quantized(head), tmp_path / head, BCQConfig(bits=3, group_size=32))
    with safe_open(tmp_path / "bf16" / BASE_WEIGHTS, "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    with safe_open(tmp_path / "bcq" / BASE_WEIGHTS, "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
        assert f.get_tensor("lm_head.packed_codes").shape == (4, VOCAB, 8)


def test_block_fingerprint_ignores_the_head_but_the_head_codes_are_checked(tmp_path) -> None:
    keep, bcq = quantized("keep"), quantized("bcq")
    assert base_fingerprint(keep) == base_fingerprint(bcq)
    save_quantized(bcq, tmp_path / "base", BCQConfig(bits=3, group_size=32, method="offset"))
    config_path = tmp_path / "base" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["head"]["fingerprint"] = "0" * 16
    config_path.write_text(json.dumps(config))
    reseal_base(tmp_path / "base")  # reach the fingerprint check, past the integrity one
    with pytest.raises(CheckpointError, match="head fingerprint"):
        load_quantized(tmp_path / "base")


def test_adapter_tuned_with_one_head_loads_with_another(tmp_path) -> None:
    keep, bcq = quantized("keep"), quantized("bcq")
    report = prepare_for_alphatuning(keep, AlphaTuningConfig())
    assert prepare_for_alphatuning(bcq, AlphaTuningConfig()) == report  # the head is not tuned
    assert not any(n.startswith("lm_head") for n in trainable_state(bcq))
    with torch.no_grad():
        for p in trainable_state(keep).values():
            p.mul_(1.1)
    save_adapter(keep, tmp_path / "adapter", AlphaTuningConfig())
    load_adapter(bcq, tmp_path / "adapter")
    for name, p in trainable_state(keep).items():
        assert torch.equal(bcq.get_parameter(name), p), name


def test_old_base_without_head_fields_loads(tmp_path) -> None:
    model = quantized("keep")
    save_quantized(model, tmp_path / "base", BCQConfig(bits=3, group_size=32, method="offset"))
    config_path = tmp_path / "base" / "config.json"
    config = json.loads(config_path.read_text())
    qconfig = config["quantization_config"]
    assert qconfig["format_version"] == 1 and "head" not in qconfig
    # What version-1 files written before the option (and before content hashes) hold.
    for key in ("lm_head", "lm_head_bits", "integrity"):
        del qconfig[key]
    config_path.write_text(json.dumps(config))
    loaded, _ = load_quantized(tmp_path / "base")
    assert torch.equal(logits(model), logits(loaded))
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight  # still tied


def test_newer_base_format_is_refused(tmp_path) -> None:
    save_quantized(quantized("bf16"), tmp_path / "base", BCQConfig(bits=3, group_size=32))
    config_path = tmp_path / "base" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["format_version"] = NEWEST_BASE_FORMAT + 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer than this alphatune"):
        load_quantized(tmp_path / "base")


def test_summary_reports_the_head_apart() -> None:
    models = {head: quantized(head) for head in ("keep", "bf16", "bcq")}
    sizes = {head: summarize(model) for head, model in models.items()}
    assert all(summary.layers == 14 for summary in sizes.values())
    assert sizes["keep"].lm_head == "keep" and sizes["keep"].lm_head_bytes == 0
    assert sizes["bf16"].lm_head == "bf16" and sizes["bf16"].lm_head_bytes == 2 * VOCAB * 64
    assert sizes["bcq"].lm_head == "bcq"
    assert sizes["bcq"].lm_head_bytes == models["bcq"].lm_head.storage_bytes()
    for summary in sizes.values():
        assert summary.quantized_bytes == sizes["keep"].quantized_bytes
        assert summary.model_bytes == (
            summary.quantized_bytes + 4 * summary.other_params + summary.lm_head_bytes
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lm_head": "fp8"}, "lm_head must be one of keep, bf16, bcq, compact"),
        ({"lm_head_bits": 0}, "lm_head_bits must be an integer in 1..8"),
        ({"embedding": "int4"}, "embedding must be one of keep, compact"),
    ],
    ids=["mode", "bits", "embedding"],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BCQConfig(**kwargs)


def test_config_round_trips_the_head_options() -> None:
    config = BCQConfig(lm_head="bcq", lm_head_bits=6, embedding="keep")
    data = json.loads(json.dumps(config.to_dict()))
    assert data["lm_head"] == "bcq" and BCQConfig.from_dict(data) == config
    assert data["embedding"] == "keep"
    default = BCQConfig()
    assert default.lm_head == "compact" and default.embedding == "compact"


def test_calibrated_bcq_head_without_data_fails_before_quantizing(tied: nn.Module) -> None:
    with pytest.raises(ConfigError, match="needs calibration"):
        quantize_lm_head(tied, BCQConfig(lm_head="bcq"))
    assert type(tied.lm_head) is nn.Linear


def test_head_group_size_must_divide(tied: nn.Module) -> None:
    with pytest.raises(ConfigError, match="does not divide in_features=64"):
        quantize_lm_head(tied, BCQConfig(group_size=48, method="offset", lm_head="bcq"))
    assert type(tied.lm_head) is nn.Linear


def test_replacing_twice_is_refused(tied: nn.Module) -> None:
    quantize_lm_head(tied, BCQConfig(lm_head="bf16"))
    with pytest.raises(ConfigError, match="already replaced"):
        quantize_lm_head(tied, BCQConfig(lm_head="bcq", method="offset"))


def test_include_and_lm_head_conflict(tied: nn.Module) -> None:
    config = BCQConfig(method="offset", include=("*",), exclude=(), lm_head="bcq")
    with pytest.raises(ConfigError, match="include patterns both quantize 'lm_head'"):
        quantize_(tied, config)


def test_model_without_head() -> None:
    with pytest.raises(UnsupportedModelError, match="no output embeddings"):
        quantize_lm_head(nn.Sequential(nn.Linear(8, 8)), BCQConfig(lm_head="bf16"))


def test_cli_quantize_with_a_bcq_head(tiny_model_dir, tmp_path) -> None:
    from alphatune.cli import main

    out = tmp_path / "base"
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
            "--lm-head",
            "bcq",
            "--lm-head-bits",
            "4",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["lm_head"] == "bcq" and qconfig["layers"]["lm_head"]["bits"] == 4
    loaded, tokenizer = load_quantized(out)
    assert isinstance(loaded.lm_head, BCQLinear) and tokenizer is not None


def test_cli_rejects_an_unknown_head(capsys) -> None:
    from alphatune.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "--output", "x", "--lm-head", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
