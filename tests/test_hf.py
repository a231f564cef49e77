"""transformers integration (``alphatune.hf``): ``from_pretrained`` reads BCQ bases and quantizes
while loading, ``save_pretrained`` writes bases; tiny Llama, GPT-2 (Conv1D) and OPT from configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sealing import reseal_base
from tiny_models import make_tiny_llama
from torch import nn

from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    BCQHfQuantizer,
    CheckpointError,
    ConfigError,
    load_adapter,
    load_quantized,
    prepare_for_alphatuning,
    quantize_,
    save_adapter,
    save_quantized,
)
from alphatune.bases import base_fingerprint
from alphatune.embedding import BCQEmbedding
from alphatune.files import BASE_CONFIG, BASE_WEIGHTS, INTEGRITY
from alphatune.layers import BCQLinear
from alphatune.lm_head import replaced_head

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM

CONFIG = BCQConfig(bits=3, group_size=32, method="offset")
VOCAB = 128
INPUT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
TARGETS = {"llama": 14, "gpt2": 8, "opt": 12}  # quantized layers of each tiny model


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def make(arch: str) -> nn.Module:
    """A seeded tiny model of ``arch`` in eval mode (the same weights on every call)."""
    if arch == "llama":
        return make_tiny_llama(VOCAB)
    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    return transformers.OPTForCausalLM(config).eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def quantized(arch: str, config: BCQConfig = CONFIG) -> nn.Module:
    model = make(arch)
    quantize_(model, config)
    return model


@pytest.fixture(scope="module", params=list(TARGETS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def base(arch, tmp_path_factory) -> tuple[nn.Module, Path]:
    """A quantized tiny model and its base saved by ``save_quantized``."""
    model = quantized(arch)
    path = tmp_path_factory.mktemp(f"base-{arch}")
    save_quantized(model, path, CONFIG)
    return model, path


def assert_loaded_packed(model: nn.Module, arch: str) -> None:
    """Every target is a BCQLinear with packed codes; no full-precision weight of it exists."""
    layers = [m for m in model.modules() if isinstance(m, BCQLinear)]
    assert len(layers) == TARGETS[arch]
    assert all(layer.packed_codes.dtype == torch.uint8 for layer in layers)
    names = {n for n, m in model.named_modules() if isinstance(m, BCQLinear)}
    assert not any(
        k.rpartition(".")[0] in names and k.endswith(".weight") for k in model.state_dict()
    )
    assert not any(t.is_meta for t in model.state_dict().values())
    assert isinstance(model.hf_quantizer, BCQHfQuantizer) and not model.training
    # The default: the tied embedding and head are one compact table, no fp32 copy of it.
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, BCQEmbedding) and model.get_output_embeddings().table is embedding
    size = embedding.num_embeddings * embedding.embedding_dim
    assert not any(t.is_floating_point() and t.numel() >= size for t in model.state_dict().values())


# ---------------------------------------------------------------- loading a base
def test_from_pretrained_loads_a_base_into_bcq_layers(base, arch) -> None:
    model, path = base
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert_loaded_packed(loaded, arch)
    reference, _ = load_quantized(path)
    assert torch.equal(logits(loaded), logits(reference))
    assert torch.equal(logits(loaded), logits(model))
    assert base_fingerprint(loaded) == base_fingerprint(model)


def test_save_pretrained_writes_the_packed_base(base, arch, tmp_path, caplog) -> None:
    """From a loaded base, and straight after quantize_: both loaders read it back, checked."""
    model, path = base
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "resaved")
    model.save_pretrained(tmp_path / "direct")  # quantize_ gave the model the quantizer
    for saved in (tmp_path / "resaved", tmp_path / "direct"):
        # The same packed tensors as save_quantized, byte for byte, and sealed.
        assert (saved / BASE_WEIGHTS).read_bytes() == (path / BASE_WEIGHTS).read_bytes()
        qconfig = json.loads((saved / BASE_CONFIG).read_text())["quantization_config"]
        assert qconfig["quant_method"] == "alphatune_bcq" and "json" in qconfig[INTEGRITY]
        with caplog.at_level(logging.WARNING, logger="alphatune"):
            again, _ = load_quantized(saved)
        assert "without content hashes" not in caplog.text
        assert torch.equal(logits(again), logits(model))
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(saved)), logits(model))


def test_a_base_from_load_quantized_saves_with_save_pretrained(base, tmp_path) -> None:
    model, path = base
    loaded, _ = load_quantized(path)
    loaded.save_pretrained(tmp_path / "out")
    assert torch.equal(logits(load_quantized(tmp_path / "out")[0]), logits(model))


# ---------------------------------------------------------------- quantizing while loading
def test_from_pretrained_quantizes_while_loading(arch, tmp_path) -> None:
    make(arch).save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=CONFIG)
    assert_loaded_packed(model, arch)
    assert torch.equal(logits(model), logits(quantized(arch)))  # what quantize_ gives
    model.save_pretrained(tmp_path / "base")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(logits(reloaded), logits(model))
    assert torch.equal(logits(load_quantized(tmp_path / "base")[0]), logits(model))


def test_mixed_precision_goes_through_both_paths(tmp_path) -> None:
    """``layer_bits`` while loading equals ``quantize_``; the saved base keeps each layer's bits."""
    config = BCQConfig(bits=3, group_size=32, method="offset", layer_bits={"*.down_proj": 4})
    make("llama").save_pretrained(tmp_path / "fp")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    bits = {n: m.bits for n, m in model.named_modules() if isinstance(m, BCQLinear)}
    assert {n for n, b in bits.items() if b == 4} == {
        f"model.layers.{i}.mlp.down_proj" for i in range(2)
    }
    assert set(bits.values()) == {3, 4}
    assert torch.equal(logits(model), logits(quantized("llama", config)))
    model.save_pretrained(tmp_path / "base")
    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        load_quantized(tmp_path / "base")[0],
    ):
        assert {n: m.bits for n, m in loaded.named_modules() if isinstance(m, BCQLinear)} == bits
        assert torch.equal(logits(loaded), logits(model))


def test_the_first_matching_layer_bits_pattern_survives_saving(tmp_path) -> None:
    """Overlapping patterns in an order that is not alphabetical: the loaded config still gives
    each layer the bits it was quantized with."""
    config = BCQConfig(
        bits=3, group_size=32, method="offset", layer_bits={"model.layers.0.*": 2, "*.mlp.*": 4}
    )
    model = quantized("llama", config)
    assert model.model.layers[0].mlp.down_proj.bits == 2
    assert model.model.layers[1].mlp.down_proj.bits == 4
    save_quantized(model, tmp_path / "base", config)
    loaded = BCQConfig.from_dict(
        json.loads((tmp_path / "base" / BASE_CONFIG).read_text())["quantization_config"]
    )
    assert loaded.layer_bits == config.layer_bits
    for name, layer in load_quantized(tmp_path / "base")[0].named_modules():
        if isinstance(layer, BCQLinear):
            assert layer.bits == loaded.bits_for(name) == config.bits_for(name)


def test_a_layer_bits_pattern_naming_no_layer_is_refused_before_loading(tmp_path) -> None:
    make("llama").save_pretrained(tmp_path / "fp")
    config = BCQConfig(bits=3, group_size=32, method="offset", layer_bits={"*.w2": 4})
    with pytest.raises(ConfigError, match="'\\*.w2' matches none"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)


@pytest.mark.parametrize("head", ["bf16", "bcq"])
def test_replaced_heads_go_through_transformers(head, tmp_path) -> None:
    config = BCQConfig(bits=3, group_size=32, method="offset", lm_head=head)
    make("llama").save_pretrained(tmp_path / "fp")  # tied embeddings
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    expected = quantized("llama", config)
    assert replaced_head(model) == replaced_head(expected)
    assert torch.equal(logits(model), logits(expected))
    model.save_pretrained(tmp_path / "base")
    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        load_quantized(tmp_path / "base")[0],
    ):
        assert replaced_head(loaded) == replaced_head(expected)
        assert torch.equal(logits(loaded), logits(expected))


def test_kept_embedding_and_head_go_through_transformers(tmp_path) -> None:
    config = BCQConfig(bits=3, group_size=32, method="offset", lm_head="keep", embedding="keep")
    make("llama").save_pretrained(tmp_path / "fp")  # tied embeddings
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    expected = quantized("llama", config)
    assert torch.equal(logits(model), logits(expected))
    model.save_pretrained(tmp_path / "base")
    qconfig = json.loads((tmp_path / "base" / BASE_CONFIG).read_text())["quantization_config"]
    assert qconfig["format_version"] == 1 and qconfig["embedding"] == "keep"
    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        load_quantized(tmp_path / "base")[0],
    ):
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight  # still tied
        assert torch.equal(logits(loaded), logits(expected))


def test_an_untied_model_gets_two_tables_through_transformers(tmp_path) -> None:
    model = make("llama")
    model.config.tie_word_embeddings = False
    untied = type(model)(model.config).eval()
    untied.save_pretrained(tmp_path / "fp")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=CONFIG)
    assert not loaded.lm_head.shared and loaded.lm_head.table is not loaded.model.embed_tokens
    loaded.save_pretrained(tmp_path / "base")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert not again.lm_head.shared
    assert torch.equal(logits(again), logits(loaded))


def test_calibrated_needs_the_two_step_path(tmp_path) -> None:
    make("llama").save_pretrained(tmp_path / "fp")
    with pytest.raises(ConfigError, match=r"quantize_\(model, config, calibration="):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=BCQConfig())


def test_a_group_size_that_fits_no_layer_is_refused_before_loading(tmp_path) -> None:
    make("llama").save_pretrained(tmp_path / "fp")
    with pytest.raises(ConfigError, match="does not divide"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "fp", quantization_config=BCQConfig(group_size=48, method="offset")
        )


def test_an_adapter_tuned_on_a_transformers_base_loads_on_load_quantized(base, tmp_path) -> None:
    _, path = base
    model = AutoModelForCausalLM.from_pretrained(path)
    prepare_for_alphatuning(model, AlphaTuningConfig())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BCQLinear):
                module.alpha1.mul_(1.25)
    save_adapter(model, tmp_path / "adapter", AlphaTuningConfig())
    other, _ = load_quantized(path)
    load_adapter(other, tmp_path / "adapter")
    assert torch.equal(logits(other), logits(model.eval()))


# ---------------------------------------------------------------- files from elsewhere
@pytest.fixture
def llama_base(tmp_path) -> Path:
    """A Llama base saved by save_pretrained (its config records the dtype, as real ones do)."""
    model = quantized("llama")
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def edit_config(path: Path, edit) -> None:
    document = json.loads((path / BASE_CONFIG).read_text())
    edit(document)
    (path / BASE_CONFIG).write_text(json.dumps(document))


def test_bcq_as_quant_method_loads_too(llama_base) -> None:
    edit_config(llama_base, lambda d: d["quantization_config"].update(quant_method="bcq"))
    reseal_base(llama_base)
    assert isinstance(AutoModelForCausalLM.from_pretrained(llama_base).hf_quantizer, BCQHfQuantizer)
    load_quantized(llama_base)


def loaders(path: Path):
    return [lambda: AutoModelForCausalLM.from_pretrained(path), lambda: load_quantized(path)]


def test_a_base_of_a_newer_format_is_refused(llama_base) -> None:
    edit_config(llama_base, lambda d: d["quantization_config"].update(format_version=99))
    for load in loaders(llama_base):
        with pytest.raises(CheckpointError, match=r"config\.json: base format_version 99 is newer"):
            load()


def test_a_half_written_weights_file_is_named(llama_base) -> None:
    weights = llama_base / BASE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for load in loaders(llama_base):
        with pytest.raises(CheckpointError, match=f"{weights}.*truncated or corrupted"):
            load()


@pytest.mark.parametrize("reseal", [True, False], ids=["resealed", "as-is"])
def test_a_missing_tensor_is_named(llama_base, reseal) -> None:
    weights = llama_base / BASE_WEIGHTS
    tensors = load_file(weights)
    del tensors["model.layers.0.self_attn.q_proj.alpha1"]
    save_file(tensors, weights, metadata={"format": "pt"})
    if reseal:  # the integrity record agrees: the name check still catches it
        reseal_base(llama_base)
    for load in loaders(llama_base):
        with pytest.raises(CheckpointError, match=f"{weights}.*q_proj.alpha1"):
            load()


def test_a_flipped_byte_is_named(llama_base) -> None:
    weights = llama_base / BASE_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    for load in loaders(llama_base):
        with pytest.raises(CheckpointError, match=f"{weights}: tensor .* does not match the hash"):
            load()


def test_a_base_of_another_quant_method_is_named(llama_base) -> None:
    edit_config(llama_base, lambda d: d["quantization_config"].update(quant_method="awq"))
    with pytest.raises(CheckpointError, match=r"config\.json: the model is quantized with 'awq'"):
        load_quantized(llama_base)


def test_a_sharded_checkpoint_is_not_a_base(llama_base) -> None:
    """A base is one model.safetensors: shards (which save_quantized never writes) are refused."""
    shard = "model-00001-of-00001.safetensors"
    names = list(load_file(llama_base / BASE_WEIGHTS))
    (llama_base / BASE_WEIGHTS).rename(llama_base / shard)
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
    (llama_base / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"one {BASE_WEIGHTS}.*{shard}"):
        AutoModelForCausalLM.from_pretrained(llama_base)


@pytest.mark.model
def test_the_embedded_model_through_transformers(tmp_path) -> None:
    """SmolLM2: quantize while loading = load then quantize_; save_pretrained; both loaders."""
    from alphatune.models import load_model, resolve_model_path

    config = BCQConfig(bits=3, method="offset", iterations=2)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(), quantization_config=config)
    assert sum(isinstance(m, BCQLinear) for m in model.modules()) == 210
    reference = load_model()
    quantize_(reference, config)
    assert torch.equal(logits(model), logits(reference))
    model.save_pretrained(tmp_path / "base")
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "base")), logits(reference)
    )
    assert torch.equal(logits(load_quantized(tmp_path / "base")[0]), logits(reference))
