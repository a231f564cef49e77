"""Save/load of the quantized base and of task adapters."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_tiny_llama

from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    prepare_for_alphatuning,
    quantize_,
)
from alphatune.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_WEIGHTS,
    base_fingerprint,
    load_adapter,
    load_quantized,
    save_adapter,
    save_quantized,
)

CONFIG = BCQConfig(bits=3, group_size=32, method="offset")
INPUT = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def quantized_model(seed: int = 0):
    model = make_tiny_llama(128, seed=seed)
    quantize_(model, CONFIG)
    return model


@pytest.fixture
def saved_base(tmp_path):
    model = quantized_model()
    save_quantized(model, tmp_path / "base", CONFIG)
    return model, tmp_path / "base"


def logits(model, ids=INPUT):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_base_round_trip_is_bit_exact(saved_base):
    model, path = saved_base
    loaded, tokenizer = load_quantized(path)
    assert tokenizer is None
    assert torch.equal(logits(model), logits(loaded))
    assert base_fingerprint(model) == base_fingerprint(loaded)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "alphatune_bcq" and config["bits"] == 3
    assert len(config["layers"]) == 14


def test_base_stores_packed_codes_and_tied_weights_once(saved_base):
    from safetensors import safe_open

    _, path = saved_base
    with safe_open(path / BASE_WEIGHTS, "pt") as f:
        keys = set(f.keys())
        codes = f.get_tensor("model.layers.0.self_attn.q_proj.packed_codes")
        alpha = f.get_tensor("model.layers.0.self_attn.q_proj.alpha_rest")
    assert codes.dtype == torch.uint8 and codes.shape == (3, 64, 8)
    assert alpha.dtype == torch.float16  # lossless: scales were rounded to fp16 when quantized
    assert not any(k.endswith(".weight") and "proj" in k for k in keys)
    # The tied embedding and head: one compact 8-bit table under the embedding's name only.
    assert not any(k.startswith("lm_head") for k in keys)
    assert "model.embed_tokens.weight" not in keys
    with safe_open(path / BASE_WEIGHTS, "pt") as f:
        table = f.get_tensor("model.embed_tokens.packed_codes")
        scales = f.get_tensor("model.embed_tokens.alpha")
    assert table.dtype == torch.uint8 and table.shape == (8, 128, 8)
    assert scales.dtype == torch.float16


def test_adapter_round_trip_restores_tuned_logits(saved_base, tmp_path):
    model, path = saved_base
    report = prepare_for_alphatuning(model, AlphaTuningConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.1)
    save_adapter(model, tmp_path / "adapter", AlphaTuningConfig(), metadata={"task": "x"})
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    size = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < 4 * report.trainable + 4096  # alpha only, no base weights
    base, _ = load_quantized(path)
    assert not torch.equal(logits(base), logits(model))
    meta = load_adapter(base, tmp_path / "adapter")
    assert meta["metadata"]["task"] == "x"
    assert torch.equal(logits(base), logits(model))


def test_adapter_on_a_different_base_is_refused(saved_base, tmp_path):
    model, _ = saved_base
    prepare_for_alphatuning(model)
    save_adapter(model, tmp_path / "adapter", AlphaTuningConfig())
    other = quantized_model(seed=1)
    with pytest.raises(CheckpointError, match="tuned on base .* this base is"):
        load_adapter(other, tmp_path / "adapter")


def test_truncated_base_file_is_a_clear_error(saved_base):
    _, path = saved_base
    weights = path / BASE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=BASE_WEIGHTS):
        load_quantized(path)


def test_corrupted_codes_fail_the_hash_and_the_fingerprint(saved_base):
    from safetensors.torch import load_file, save_file

    _, path = saved_base
    tensors = load_file(path / BASE_WEIGHTS)
    tensors["model.layers.1.mlp.up_proj.packed_codes"][0, 0, 0] ^= 0xFF
    save_file(tensors, path / BASE_WEIGHTS)
    with pytest.raises(CheckpointError, match="up_proj.packed_codes' does not match the hash"):
        load_quantized(path)
    # A base written before content hashes were recorded still has the codes' fingerprint.
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]["integrity"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_quantized(path)


def test_missing_tensor_in_base_names_it(saved_base):
    from safetensors.torch import load_file, save_file

    _, path = saved_base
    tensors = load_file(path / BASE_WEIGHTS)
    del tensors["model.norm.weight"]
    save_file(tensors, path / BASE_WEIGHTS)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_quantized(path)


def test_missing_tensor_in_adapter_names_it(saved_base, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = saved_base
    prepare_for_alphatuning(model)
    save_adapter(model, tmp_path / "adapter", AlphaTuningConfig())
    weights = tmp_path / "adapter" / ADAPTER_WEIGHTS
    tensors = load_file(weights)
    removed = min(tensors)
    del tensors[removed]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="lacks tensors"):
        load_adapter(model, tmp_path / "adapter")


def test_missing_or_corrupted_adapter_config(saved_base, tmp_path):
    model, _ = saved_base
    with pytest.raises(CheckpointError, match="missing"):
        load_adapter(model, tmp_path / "nowhere")
    prepare_for_alphatuning(model)
    save_adapter(model, tmp_path / "adapter", AlphaTuningConfig())
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_adapter(model, tmp_path / "adapter")


def test_existing_output_is_never_overwritten_silently(saved_base):
    model, path = saved_base
    before = (path / BASE_WEIGHTS).read_bytes()
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_quantized(model, path, CONFIG)
    assert (path / BASE_WEIGHTS).read_bytes() == before
    save_quantized(model, path, CONFIG, overwrite=True)
    assert (path / "config.json").exists()


def test_a_plain_model_directory_is_not_a_base(tmp_path):
    model = make_tiny_llama(128)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no alphatune quantization_config"):
        load_quantized(tmp_path / "plain")


def test_switching_adapters_leaves_nothing_of_the_previous_one(saved_base, tmp_path):
    from alphatune.adapters import unload_adapter

    model, path = saved_base
    base_logits = logits(model)
    # Adapter A trains all scales; adapter B only alpha1.
    prepare_for_alphatuning(model, AlphaTuningConfig(train="all_alpha"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.2)
    save_adapter(model, tmp_path / "a", AlphaTuningConfig(train="all_alpha"))
    fresh, _ = load_quantized(path)
    prepare_for_alphatuning(fresh, AlphaTuningConfig())
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.mul_(0.9)
    expected_b = logits(fresh)
    save_adapter(fresh, tmp_path / "b", AlphaTuningConfig())

    served, _ = load_quantized(path)
    load_adapter(served, tmp_path / "a")
    assert torch.equal(logits(served), logits(model))
    load_adapter(served, tmp_path / "b")
    assert torch.equal(logits(served), expected_b)
    unload_adapter(served)
    assert torch.equal(logits(served), base_logits)


def test_overwrite_never_touches_a_foreign_directory(tmp_path):
    model = quantized_model()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CheckpointError, match="not written by alphatune"):
        save_quantized(model, foreign, CONFIG, overwrite=True)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"
    assert sorted(p.name for p in foreign.iterdir()) == ["cat.jpg"]


def test_adapter_from_a_newer_format_is_refused(saved_base, tmp_path):
    model, _ = saved_base
    prepare_for_alphatuning(model)
    save_adapter(model, tmp_path / "adapter", AlphaTuningConfig())
    config_path = tmp_path / "adapter" / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer than this alphatune"):
        load_adapter(model, tmp_path / "adapter")
