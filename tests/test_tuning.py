"""``prepare_for_alphatuning``: what trains after quantization, and the trainable-parameter report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from alphatune.config import AlphaTuningConfig, BCQConfig
from alphatune.errors import ConfigError
from alphatune.layers import BCQLinear
from alphatune.quantize import quantize_
from alphatune.tuning import prepare_for_alphatuning, trainable_state

transformers = pytest.importorskip("transformers")

GROUP_SIZE = 32
BITS = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


@pytest.fixture(scope="module")
def fp_params(llama_base: nn.Module) -> int:
    return sum(p.numel() for p in llama_base.parameters())


@pytest.fixture(scope="module")
def _quantized_bases(llama_base: nn.Module) -> dict[str, nn.Module]:
    bases = {}
    for method in ("greedy", "offset"):
        model = copy.deepcopy(llama_base)
        quantize_(model, BCQConfig(bits=BITS, group_size=GROUP_SIZE, method=method))
        bases[method] = model
    return bases


@pytest.fixture
def greedy_model(_quantized_bases: dict[str, nn.Module]) -> nn.Module:
    return copy.deepcopy(_quantized_bases["greedy"])


@pytest.fixture
def offset_model(_quantized_bases: dict[str, nn.Module]) -> nn.Module:
    return copy.deepcopy(_quantized_bases["offset"])


def _layers(model: nn.Module) -> list[BCQLinear]:
    return [m for m in model.modules() if isinstance(m, BCQLinear)]


def _scales_per_plane(model: nn.Module) -> int:
    """Σ out × G over the quantized layers."""
    return sum(m.out_features * (m.in_features // m.group_size) for m in _layers(model))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_default_trains_alpha1_only(greedy_model: nn.Module, fp_params: int) -> None:
    report = prepare_for_alphatuning(greedy_model)
    expected = _scales_per_plane(greedy_model)
    assert len(_layers(greedy_model)) == 14
    assert report.trainable == expected == _trainable(greedy_model)
    assert report.total == fp_params  # the model before quantization (Llama: no biases)
    assert report.ratio == pytest.approx(fp_params / expected)
    assert report.percent == pytest.approx(100 * expected / fp_params)
    names = list(trainable_state(greedy_model))
    assert len(names) == 14 and all(n.endswith(".alpha1") for n in names)


def test_all_alpha_adds_alpha_rest(greedy_model: nn.Module) -> None:
    report = prepare_for_alphatuning(greedy_model, AlphaTuningConfig(train="all_alpha"))
    assert report.trainable == BITS * _scales_per_plane(greedy_model)
    for layer in _layers(greedy_model):
        assert isinstance(layer.alpha_rest, nn.Parameter) and layer.alpha_rest.requires_grad


def test_train_offset_adds_offsets(offset_model: nn.Module) -> None:
    per_plane = _scales_per_plane(offset_model)
    report = prepare_for_alphatuning(offset_model, AlphaTuningConfig(train_offset=True))
    assert report.trainable == 2 * per_plane
    both = prepare_for_alphatuning(
        offset_model, AlphaTuningConfig(train="all_alpha", train_offset=True)
    )
    assert both.trainable == (BITS + 1) * per_plane
    names = set(trainable_state(offset_model))
    assert {n.rsplit(".", 1)[1] for n in names} == {"alpha1", "alpha_rest", "offset"}


def test_train_offset_without_offsets(greedy_model: nn.Module) -> None:
    with pytest.raises(ConfigError, match="offset"):
        prepare_for_alphatuning(greedy_model, AlphaTuningConfig(train_offset=True))


def test_model_without_bcq_layers(llama_base: nn.Module) -> None:
    with pytest.raises(ConfigError, match="quantize_"):
        prepare_for_alphatuning(copy.deepcopy(llama_base))


def test_preparing_again_refreezes(greedy_model: nn.Module) -> None:
    prepare_for_alphatuning(greedy_model, AlphaTuningConfig(train="all_alpha"))
    report = prepare_for_alphatuning(greedy_model)
    assert report.trainable == _scales_per_plane(greedy_model)
    assert all(n.endswith(".alpha1") for n in trainable_state(greedy_model))


def test_embeddings_norms_and_head_are_frozen(offset_model: nn.Module) -> None:
    prepare_for_alphatuning(offset_model, AlphaTuningConfig(train="all_alpha", train_offset=True))
    for name, module in offset_model.named_modules():
        if isinstance(module, BCQLinear):
            continue
        for pname, p in module.named_parameters(recurse=False):
            assert not p.requires_grad, f"{name}.{pname}"
    assert not offset_model.get_input_embeddings().weight.requires_grad
    assert not offset_model.lm_head.weight.requires_grad


def test_gradients_reach_only_the_trainable_scales(greedy_model: nn.Module) -> None:
    prepare_for_alphatuning(greedy_model)
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = greedy_model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    for name, p in greedy_model.named_parameters():
        if name.endswith(".alpha1"):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None, name


def test_train_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        BCQLinear.from_linear(nn.Linear(16, 4), BCQConfig(bits=2, group_size=8, method="greedy")),
        BCQLinear.from_linear(
            nn.Linear(4, 4, bias=False), BCQConfig(bits=2, group_size=None, method="greedy")
        ),
    )
    report = prepare_for_alphatuning(model, AlphaTuningConfig(train_bias=True))
    assert sorted(trainable_state(model)) == ["0.alpha1", "0.bias", "1.alpha1"]
    assert report.trainable == 4 * 2 + 4 + 4 * 1
    assert report.total == 16 * 4 + 4 + 4 * 4  # weights and the bias of the original layers


def test_row_granularity_trains_one_multiplier_per_row(
    greedy_model: nn.Module, exact_tables: None
) -> None:
    before = greedy_model(torch.arange(8)[None]).logits
    report = prepare_for_alphatuning(greedy_model, AlphaTuningConfig(granularity="row"))
    layers = _layers(greedy_model)
    assert report.trainable == sum(layer.out_features for layer in layers)
    assert all(not layer.alpha1.requires_grad for layer in layers)
    with torch.no_grad():  # a multiplier of 1 changes nothing
        torch.testing.assert_close(greedy_model(torch.arange(8)[None]).logits, before)
    greedy_model(torch.arange(8)[None]).logits.sum().backward()
    assert all(layer.alpha1_scale.grad is not None for layer in layers)
    prepare_for_alphatuning(greedy_model, AlphaTuningConfig())  # back to α₁ itself
    assert all(not layer.alpha1_scale.requires_grad for layer in layers)


def test_group_multiplier_trains_one_value_per_alpha1(greedy_model: nn.Module) -> None:
    report = prepare_for_alphatuning(greedy_model, AlphaTuningConfig(multiplier=True))
    layers = _layers(greedy_model)
    assert report.trainable == sum(layer.alpha1.numel() for layer in layers)
    assert all(layer.alpha1_scale.shape == layer.alpha1.shape for layer in layers)
    with pytest.raises(ConfigError, match="already carries per-group α₁ multipliers"):
        prepare_for_alphatuning(greedy_model, AlphaTuningConfig(granularity="row"))


def test_row_granularity_needs_alpha1_training() -> None:
    with pytest.raises(ConfigError, match="granularity='row' trains a multiplier of α₁ only"):
        AlphaTuningConfig(granularity="row", train="all_alpha")
    with pytest.raises(ConfigError, match="granularity must be one of 'group', 'row'"):
        AlphaTuningConfig(granularity="column")


def test_group_size_gradient_scaling_divides_the_scale_gradients(offset_model: nn.Module) -> None:
    def grads(scale: str) -> list[torch.Tensor]:
        prepare_for_alphatuning(
            offset_model,
            AlphaTuningConfig(train="all_alpha", train_offset=True, alpha_grad_scale=scale),
        )
        offset_model.zero_grad()
        offset_model(torch.arange(8)[None]).logits.square().mean().backward()
        return [
            p.grad.clone()
            for layer in _layers(offset_model)
            for p in (layer.alpha1, layer.alpha_rest, layer.offset)
        ]

    plain, scaled = grads("none"), grads("group_size")
    sizes = [layer.group_size for layer in _layers(offset_model) for _ in range(3)]
    for g, a, b in zip(sizes, plain, scaled, strict=True):
        torch.testing.assert_close(b, a / g)
