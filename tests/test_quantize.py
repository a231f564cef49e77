"""``quantize_`` on tiny Llama and GPT-2 models, target selection, summaries and configs."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alphatune import bcq
from alphatune.config import AlphaTuningConfig, BCQConfig, QuantMethod, TrainConfig
from alphatune.embedding import BCQEmbedding, BCQHead
from alphatune.errors import ConfigError, UnsupportedModelError
from alphatune.layers import BCQLinear
from alphatune.quantize import find_target_layers, quantize_

transformers = pytest.importorskip("transformers")

LLAMA_PER_BLOCK = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
GPT2_PER_BLOCK = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
LLAMA_TARGETS = [f"model.layers.{i}.{n}" for i in range(2) for n in LLAMA_PER_BLOCK]
GPT2_TARGETS = [f"transformer.h.{i}.{n}" for i in range(2) for n in GPT2_PER_BLOCK]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


@pytest.fixture(scope="module")
def gpt2_base() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=128,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama(llama_base: nn.Module) -> nn.Module:
    return copy.deepcopy(llama_base)


@pytest.fixture
def gpt2(gpt2_base: nn.Module) -> nn.Module:
    return copy.deepcopy(gpt2_base)


@pytest.fixture(params=["llama", "gpt2"])
def arch(request: pytest.FixtureRequest) -> tuple[nn.Module, list[str]]:
    """(fresh model, its expected target names)."""
    model = request.getfixturevalue(request.param)
    return model, LLAMA_TARGETS if request.param == "llama" else GPT2_TARGETS


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, BCQLinear)]


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_find_target_layers_in_model_order(arch) -> None:
    model, expected = arch
    assert list(find_target_layers(model, BCQConfig(method="greedy"))) == expected


@pytest.mark.parametrize("method", ["greedy", "offset"])
@pytest.mark.parametrize("ends", ["keep", "compact"])
def test_quantize_replaces_exactly_the_block_linears(arch, method: str, ends: str) -> None:
    model, expected = arch
    embedding_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    ends_names = (embedding_name, "lm_head") if ends == "compact" else ()
    untouched = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not n.startswith(tuple(expected) + ends_names)
    }
    config = BCQConfig(bits=3, group_size=32, method=method, lm_head=ends, embedding=ends)
    summary = quantize_(model, config)
    assert _quantized_names(model) == expected
    assert summary.layers == len(expected)
    if ends == "keep":
        assert type(model.lm_head) is nn.Linear
        assert isinstance(model.get_input_embeddings(), nn.Embedding)
    else:
        assert isinstance(model.lm_head, BCQHead)
        assert isinstance(model.get_input_embeddings(), BCQEmbedding)
    for name, value in untouched.items():  # norms (and the kept embeddings, lm_head): the same
        assert torch.equal(model.get_parameter(name), value), name


@pytest.mark.parametrize("method", ["greedy", "offset"])
@pytest.mark.parametrize("bits", [2, 4], ids=lambda b: f"bits={b}")
def test_summary_sizes(arch, bits: int, method: str) -> None:
    model, _ = arch
    total_before = _param_count(model)
    shapes = [
        (m.weight.shape if isinstance(m, nn.Linear) else m.weight.T.shape, m.bias is not None)
        for m in find_target_layers(model, BCQConfig(method=method)).values()
    ]
    group_size, offsets = 32, int(method == "offset")
    config = BCQConfig(
        bits=bits, group_size=group_size, method=method, lm_head="keep", embedding="keep"
    )
    summary = quantize_(model, config)

    weights = sum(out * in_features for (out, in_features), _ in shapes)
    assert summary.quantized_params == weights
    # Biases stay in full precision and count with the other unquantized parameters.
    assert summary.quantized_params + summary.other_params == total_before
    # Codes (in_features % 8 == 0: no padding) + fp16 scales/offsets; biases are not in it.
    assert summary.bits_per_weight == pytest.approx(
        bits + 16 * (bits + offsets) / group_size, abs=1e-3
    )
    assert summary.model_bytes == summary.quantized_bytes + 4 * summary.other_params
    assert summary.compression_vs_fp32 == pytest.approx(32 / summary.bits_per_weight, rel=1e-3)
    assert summary.compression_vs_fp16 == pytest.approx(16 / summary.bits_per_weight, rel=1e-3)
    assert summary.fp32_bytes == 4 * weights and summary.fp16_bytes == 2 * weights
    data = summary.to_dict()
    assert data["layers"] == len(shapes)
    assert {"compression_vs_fp32", "compression_vs_fp16", "bits_per_weight"} <= set(data)
    json.dumps(data)


def test_summary_counts_the_compact_tables(arch) -> None:
    """The default: a compact embedding table, and a head that shares it (tied GPT-2) or has its
    own (untied Llama); every original weight is counted once."""
    model, expected = arch
    total_before = _param_count(model)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    stages: list[str] = []
    summary = quantize_(
        model,
        BCQConfig(bits=3, group_size=32, method="offset"),
        progress=lambda stage, done, total: stages.append(stage),
    )
    embedding, head = model.get_input_embeddings(), model.lm_head
    assert summary.embedding == "compact" and summary.lm_head == "compact"
    assert head.shared is tied and (head.table is embedding) is tied
    assert summary.embedding_bytes == embedding.storage_bytes()
    assert summary.embedding_params == embedding.num_embeddings * embedding.embedding_dim
    head_params = 0 if tied else head.out_features * head.in_features
    assert summary.lm_head_bytes == head.storage_bytes()
    assert summary.lm_head_bytes == (0 if tied else head.table.storage_bytes())
    assert (
        summary.quantized_params + summary.other_params + summary.embedding_params + head_params
        == total_before
    )
    assert summary.model_bytes == (
        summary.quantized_bytes
        + 4 * summary.other_params
        + summary.embedding_bytes
        + summary.lm_head_bytes
    )
    # 8 code bits per entry + fp16 scales and offset per group (of 64 here).
    entries = embedding.num_embeddings * embedding.embedding_dim
    assert summary.embedding_bytes == entries + 2 * 9 * entries // 64
    assert stages[: len(expected)] == expected and "compacting the embedding and LM head" in stages


@pytest.mark.parametrize(
    ("include", "exclude", "llama_count", "gpt2_count"),
    [
        (None, ("*mlp*",), 8, 4),
        (None, ("*.0.*",), 7, 4),
        (("*q_proj", "*c_attn"), ("*lm_head*",), 2, 2),
        (("*",), ("*lm_head*",), 14, 8),  # include overrides the block rule; exclude still wins
    ],
    ids=["exclude-mlp", "exclude-block0", "include-q", "include-all"],
)
def test_include_and_exclude_patterns(arch, include, exclude, llama_count, gpt2_count) -> None:
    model, expected = arch
    config = BCQConfig(bits=2, group_size=32, method="greedy", include=include, exclude=exclude)
    targets = list(find_target_layers(model, config))
    count = llama_count if expected is LLAMA_TARGETS else gpt2_count
    assert len(targets) == count
    assert set(targets) <= set(expected)
    if exclude == ("*mlp*",):
        assert not any("mlp" in name for name in targets)
    summary = quantize_(model, config)
    assert summary.layers == count
    assert _quantized_names(model) == targets


def test_include_can_name_the_lm_head(llama: nn.Module) -> None:
    quantize_(llama, BCQConfig(bits=2, method="greedy", include=("lm_head",), exclude=()))
    assert _quantized_names(llama) == ["lm_head"]


@pytest.mark.parametrize(
    "model_and_config",
    [
        (nn.Sequential(nn.Linear(8, 8), nn.ReLU()), BCQConfig(method="greedy")),
        (None, BCQConfig(method="greedy", exclude=("*",))),
    ],
    ids=["no-blocks", "all-excluded"],
)
def test_model_without_targets(model_and_config, llama: nn.Module) -> None:
    model, config = model_and_config
    with pytest.raises(UnsupportedModelError, match="no linear layers"):
        quantize_(model if model is not None else llama, config)


def test_group_size_that_does_not_divide_names_the_divisors(llama: nn.Module) -> None:
    with pytest.raises(ConfigError) as info:
        quantize_(llama, BCQConfig(bits=2, group_size=48, method="greedy"))
    message = str(info.value)
    assert "48" in message and "in_features=64" in message
    assert re.search(r"\[8, 16, 32, 64\]", message), message  # the multiples of 8 dividing 64
    assert _quantized_names(llama) == []  # checked before any layer is swapped


def test_group_size_auto_and_none(llama: nn.Module) -> None:
    quantize_(llama, BCQConfig(bits=2, group_size="auto", method="greedy"))
    layers = {n: m for n, m in llama.named_modules() if isinstance(m, BCQLinear)}
    assert {m.group_size for m in layers.values()} == {64, 128}  # whole rows: closest to 128


def test_calibrated_needs_calibration(llama: nn.Module) -> None:
    with pytest.raises(ConfigError, match="calibration"):
        quantize_(llama, BCQConfig(bits=4, group_size=32, method="calibrated"))
    assert _quantized_names(llama) == []


def test_unknown_hessian_precision_fails_before_quantizing(
    llama: nn.Module, tokens: torch.Tensor
) -> None:
    with pytest.raises(ConfigError, match="hessian_precision must be one of auto"):
        quantize_(
            llama,
            BCQConfig(bits=3, group_size=32, method="calibrated"),
            calibration=tokens,
            hessian_precision="half",
        )
    assert _quantized_names(llama) == []


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one-pass"])
def test_calibrated_keeps_the_logits_close(arch, tokens: torch.Tensor, sequential: bool) -> None:
    model, expected = arch
    reference = _logits(model, tokens)
    stages: list[tuple[str, int, int]] = []
    summary = quantize_(
        model,
        BCQConfig(bits=4, group_size=32, method="calibrated", lm_head="keep", embedding="keep"),
        calibration=tokens,
        sequential=sequential,
        progress=lambda stage, done, total: stages.append((stage, done, total)),
    )
    assert summary.layers == len(expected)
    assert all(
        isinstance(m, BCQLinear) and m.offset is not None
        for n, m in model.named_modules()
        if n in expected
    )
    assert _cosine(_logits(model, tokens), reference) > 0.99  # measured > 0.999
    assert [s for s in stages if s[0] != "calibrating"] == [
        (name, i + 1, len(expected)) for i, name in enumerate(expected)
    ]
    # One-pass calibration runs the whole model first; sequential runs block by block.
    assert (("calibrating", 1, 1) in stages) is not sequential


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "one-pass"])
def test_the_heap_is_trimmed_once_a_block_when_sequential(
    llama: nn.Module, tokens: torch.Tensor, sequential: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``malloc_trim`` costs ~10 ms a call: sequential calibration trims after each block (2
    here) and after each layer outside the blocks (the head, included by pattern), the one-pass
    mode after each layer (15), and both once more at the end."""
    calls: list[int] = []
    monkeypatch.setattr("alphatune.quantize.release_free_memory", lambda: calls.append(1))
    config = BCQConfig(
        bits=3,
        group_size=32,
        method="calibrated",
        include=["model.layers.*", "lm_head"],
        exclude=[],
        lm_head="keep",
        embedding="keep",
    )
    quantize_(llama, config, calibration=tokens, sequential=sequential)
    assert isinstance(llama.lm_head, BCQLinear)
    assert len(calls) == (2 + 1 if sequential else len(LLAMA_TARGETS) + 1) + 1


@pytest.mark.parametrize("method", ["offset", "calibrated"])
def test_eight_bits_is_close_to_full_precision(arch, method: str, tokens: torch.Tensor) -> None:
    model, _ = arch
    reference = _logits(model, tokens)
    quantize_(model, BCQConfig(bits=8, group_size=32, method=method), calibration=tokens)
    logits = _logits(model, tokens)
    assert bcq.sqnr_db(reference, logits) > 35.0  # measured > 45 dB
    assert _cosine(logits, reference) > 0.9999


def test_more_bits_give_closer_logits(llama_base: nn.Module, tokens: torch.Tensor) -> None:
    reference = _logits(llama_base, tokens)
    sqnr = []
    for bits in (2, 4, 8):
        model = copy.deepcopy(llama_base)
        quantize_(model, BCQConfig(bits=bits, group_size=32, method="offset"))
        sqnr.append(bcq.sqnr_db(reference, _logits(model, tokens)))
    assert sqnr[0] < sqnr[1] < sqnr[2], sqnr


def test_training_mode_is_kept(llama: nn.Module) -> None:
    llama.train()
    quantize_(llama, BCQConfig(bits=2, group_size=32, method="greedy"))
    assert all(m.training for m in llama.modules())


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 0},
        {"bits": 9},
        {"bits": True},
        {"bits": 3.0},
        {"bits": "3"},
        {"group_size": "64"},
        {"group_size": "Auto"},
        {"group_size": 0},
        {"group_size": -8},
        {"group_size": True},
        {"group_size": 64.0},
        {"method": "gptq"},
        {"method": "Greedy"},
        {"iterations": -1},
        {"layer_bits": {"*.down_proj": 9}},
        {"layer_bits": {"*.down_proj": True}},
        {"layer_bits": {3: 4}},
        {"layer_bits": ("*.down_proj",)},
        {"layer_bits": 4},
        {"layer_bits": "*.down_proj=4"},
        {"layer_bits": [("*.v_proj", 4), ("*.v_proj", 5)]},
    ],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_bcq_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        BCQConfig(**kwargs)


@pytest.mark.parametrize("method", ["greedy", "alternating", "offset", "calibrated"])
def test_bcq_config_accepts_method_strings(method: str) -> None:
    config = BCQConfig(method=method, group_size=None)
    assert config.method is QuantMethod(method)
    assert config.method.has_offset == (method in ("offset", "calibrated"))


def test_bcq_config_group_size_for() -> None:
    assert BCQConfig(group_size=None).group_size_for(100) == 100
    assert BCQConfig(group_size=25).group_size_for(100) == 25
    assert BCQConfig(group_size="auto").group_size_for(576) == 144  # closest to 128 (log scale)
    assert BCQConfig(group_size="auto").group_size_for(512) == 128
    with pytest.raises(ConfigError, match="does not divide"):
        BCQConfig(group_size=30).group_size_for(100)


def test_bcq_config_bits_for_takes_the_first_matching_pattern() -> None:
    config = BCQConfig(bits=3, layer_bits=[("*.layers.0.*", 2), ("*.down_proj", 4)])
    assert config.layer_bits == (("*.layers.0.*", 2), ("*.down_proj", 4))
    assert config.bits_for("model.layers.0.mlp.down_proj") == 2
    assert config.bits_for("model.layers.1.mlp.down_proj") == 4
    assert config.bits_for("model.layers.1.mlp.up_proj") == 3
    assert hash(config) == hash(BCQConfig(layer_bits={"*.layers.0.*": 2, "*.down_proj": 4}))


@pytest.mark.parametrize("arch_name", ["llama", "gpt2"])
def test_layer_bits_give_mixed_precision(request, arch_name: str, tokens: torch.Tensor) -> None:
    model = request.getfixturevalue(arch_name)
    reference = _logits(model, tokens)
    pattern = "*.down_proj" if arch_name == "llama" else "*.mlp.c_proj"
    uniform = copy.deepcopy(model)
    small = quantize_(uniform, BCQConfig(bits=2, group_size=32, method="offset"))
    summary = quantize_(
        model, BCQConfig(bits=2, group_size=32, method="offset", layer_bits={pattern: 4})
    )
    bits = {n: m.bits for n, m in model.named_modules() if isinstance(m, BCQLinear)}
    wide = {n for n, b in bits.items() if b == 4}
    assert wide == {n for n in bits if n.endswith(pattern[2:])} and len(wide) == 2
    assert set(bits.values()) == {2, 4}
    assert summary.bits_per_weight > small.bits_per_weight
    assert summary.quantized_bytes > small.quantized_bytes
    # The wider layers fit closer: the mixed model's logits are nearer the original.
    assert _cosine(_logits(model, tokens), reference) > _cosine(_logits(uniform, tokens), reference)


def test_layer_bits_pattern_matching_nothing_is_an_error(llama: nn.Module) -> None:
    config = BCQConfig(bits=3, group_size=32, method="offset", layer_bits={"*.down_prj": 4})
    with pytest.raises(ConfigError, match="down_prj.*matches none"):
        quantize_(llama, config)


@pytest.mark.parametrize(
    "kwargs",
    [{"train": "alpha2"}, {"alpha_lr_scale": 0.0}, {"alpha_lr_scale": -1.0}],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_alphatuning_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AlphaTuningConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.0},
        {"batch_size": 0},
        {"warmup_ratio": 1.0},
        {"max_steps": 0},
        {"label_smoothing": -0.1},
        {"max_length": 4},
    ],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_train_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        TrainConfig(**kwargs)


CONFIGS = [
    BCQConfig(),
    BCQConfig(bits=4, group_size=64, method="offset", include=("*q_proj",), exclude=("*mlp*",)),
    BCQConfig(bits=2, group_size=None, method="greedy", iterations=0),
    BCQConfig(layer_bits={"*.o_proj": 2, "*.down_proj": 4, "*.layers.0.*": 5}),
    AlphaTuningConfig(),
    AlphaTuningConfig(train="all_alpha", train_offset=True, train_bias=True, alpha_lr_scale=0.5),
    TrainConfig(),
    TrainConfig(learning_rate=1e-4, max_steps=10, max_grad_norm=None, epochs=2.5),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_round_trip_through_json(config) -> None:
    # Sorted keys, as the saved files are written: nothing may depend on a mapping's order.
    data = json.loads(json.dumps(config.to_dict(), sort_keys=True))
    assert type(config).from_dict(data) == config


@pytest.mark.parametrize(
    "config", [BCQConfig(), AlphaTuningConfig(), TrainConfig()], ids=lambda c: type(c).__name__
)
def test_unknown_keys_warn(config, caplog: pytest.LogCaptureFixture) -> None:
    data = {**config.to_dict(), "from_the_future": 1}
    with caplog.at_level(logging.WARNING, logger="alphatune.config"):
        loaded = type(config).from_dict(data)
    assert loaded == config
    assert "from_the_future" in caplog.text
