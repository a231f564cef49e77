"""``BCQLinear``: forward against the dense weight and the reference kernel, gradients, state."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alphatune import bcq, kernels
from alphatune.autograd import BCQMatmul
from alphatune.config import AlphaTuningConfig, BCQConfig
from alphatune.errors import ConfigError
from alphatune.kernels.reference import bcq_matmul_reference
from alphatune.layers import BCQLinear
from alphatune.packing import pack_codes
from alphatune.tuning import prepare_for_alphatuning

METHODS = ["greedy", "alternating", "offset"]
# (in_features, group_size): row-wise, 'auto', a dividing int, and odd in_features with groups
# that split a code byte (20, 25) or are the whole row.
LAYOUTS = [(64, None), (64, "auto"), (64, 16), (100, 20), (100, 25), (100, None)]
X_SHAPES = [(), (3,), (2, 5)]  # leading dimensions of x: 1, 3 and 10 tokens
OUT = 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def _layout_id(layout: tuple[int, int | str | None]) -> str:
    in_features, group_size = layout
    return f"in={in_features}-g={group_size or 'row'}"


@functools.cache
def _quantized(
    method: str, bias: bool, in_features: int, group_size: int | str | None, bits: int = 3
) -> BCQLinear:
    torch.manual_seed(in_features + bits)
    linear = nn.Linear(in_features, OUT, bias=bias)
    if bias:
        nn.init.normal_(linear.bias)  # non-zero, so a dropped bias shows
    return BCQLinear.from_linear(linear, BCQConfig(bits=bits, group_size=group_size, method=method))


def _layer(method: str, bias: bool, in_features: int, group_size: int | str | None) -> BCQLinear:
    """A fresh copy of a cached quantized layer (tests may modify it)."""
    cached = _quantized(method, bias, in_features, group_size)
    layer = BCQLinear(
        cached.in_features,
        cached.out_features,
        cached.bits,
        cached.group_size,
        cached.offset is not None,
        bias=cached.bias is not None,
    )
    layer.load_state_dict(cached.state_dict())
    return layer


def _reference(layer: BCQLinear, x: torch.Tensor) -> torch.Tensor:
    y = bcq_matmul_reference(
        x,
        layer.packed_codes,
        layer.alpha.detach(),
        layer.offset,
        layer.group_size,
        layer.in_features,
    )
    return y if layer.bias is None else y + layer.bias.detach()


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("lead", X_SHAPES, ids=lambda s: f"x={(*s, 'in')}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("method", METHODS)
def test_forward_matches_dense_and_reference(
    method: str, bias: bool, layout: tuple[int, int | str | None], lead: tuple[int, ...], grad: bool
) -> None:
    in_features, group_size = layout
    layer = _quantized(method, bias, in_features, group_size)
    x = torch.randn(*lead, in_features, generator=torch.Generator().manual_seed(7))
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert y.shape == (*lead, OUT)
    assert y.requires_grad == grad  # alpha1 is a Parameter: the autograd path ran
    with torch.no_grad():
        dense = F.linear(x, layer.dequantize(), layer.bias)
        reference = _reference(layer, x)
    torch.testing.assert_close(y.detach(), dense, rtol=1e-4, atol=1e-4)  # fp32 summation order
    torch.testing.assert_close(y.detach(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_group_size_of_the_layer(layout: tuple[int, int | str | None]) -> None:
    in_features, group_size = layout
    layer = _quantized("greedy", True, in_features, group_size)
    expected = {None: in_features, "auto": in_features}.get(group_size, group_size)
    assert layer.group_size == expected
    assert layer.alpha1.shape == (OUT, in_features // expected)
    assert layer.alpha_rest.shape == (2, OUT, in_features // expected)


@pytest.mark.parametrize("method", METHODS)
def test_weight_property_is_dequantize(method: str) -> None:
    layer = _quantized(method, True, 100, 20)
    assert torch.equal(layer.weight, layer.dequantize())
    assert layer.weight.shape == (OUT, 100)
    codes = layer.codes()
    assert codes.dtype == torch.int8 and codes.shape == (3, OUT, 100)
    expected = bcq.dequantize(codes, layer.alpha.detach(), layer.offset, layer.group_size)
    assert torch.equal(layer.dequantize().detach(), expected)


@pytest.mark.parametrize("method", METHODS)
def test_from_linear_matches_the_fit(method: str) -> None:
    """The layer stores the fitted codes exactly and the scales rounded to fp16."""
    linear = nn.Linear(40, OUT)
    fitted = {
        "greedy": bcq.fit_greedy,
        "alternating": bcq.fit_alternating,
        "offset": bcq.fit_offset,
    }[method](linear.weight.detach(), 2, 8)
    layer = BCQLinear.from_linear(linear, BCQConfig(bits=2, group_size=8, method=method))
    assert torch.equal(layer.codes(), fitted.codes)
    assert torch.equal(layer.alpha.detach(), fitted.alpha.half().float())
    assert torch.equal(layer.bias.detach(), linear.bias.detach())
    assert bcq.sqnr_db(linear.weight, layer.dequantize()) > 5.0


# One token: the decode path (a LUT kernel where the CPU has one); more than LUT_MAX_TOKENS:
# batched.
CACHE_INPUTS = [(1, 1), (2, kernels.LUT_MAX_TOKENS)]


@pytest.mark.parametrize("lead", CACHE_INPUTS, ids=lambda s: f"x={(*s, 'in')}")
@pytest.mark.parametrize("scale", ["alpha1", "alpha_rest", "offset"])
def test_weight_cache_follows_in_place_changes(scale: str, lead: tuple[int, int]) -> None:
    layer = _layer("offset", True, 64, 16).eval()  # eval: caches are used
    x = torch.randn(*lead, 64)
    with torch.no_grad():
        before = layer(x)
        assert torch.equal(layer(x), before)  # served from the cache
        getattr(layer, scale).mul_(2.0)
        after = layer(x)
        expected = F.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("lead", CACHE_INPUTS, ids=lambda s: f"x={(*s, 'in')}")
def test_weight_cache_follows_load_state_dict(lead: tuple[int, int]) -> None:
    layer = _layer("greedy", True, 64, 16).eval()
    other = _layer("alternating", True, 64, 16)
    x = torch.randn(*lead, 64)
    with torch.no_grad():
        layer(x)  # fill the cache
        layer.load_state_dict(other.state_dict())
        torch.testing.assert_close(layer(x), other(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", CACHE_INPUTS, ids=lambda s: f"x={(*s, 'in')}")
def test_weight_cache_follows_an_optimizer_step(lead: tuple[int, int]) -> None:
    layer = _layer("greedy", False, 64, 16).eval()
    x = torch.randn(*lead, 64)
    with torch.no_grad():
        layer(x)  # fill the cache
    optimizer = torch.optim.SGD([layer.alpha1], lr=0.5)
    layer(x).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_only_alpha1_trains_by_default(method: str) -> None:
    model = nn.Sequential(_layer(method, True, 64, 16), _layer(method, True, 64, 16))
    prepare_for_alphatuning(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.alpha1", "1.alpha1"]
    buffers = {n for n, _ in model[0].named_buffers()}
    expected = {"packed_codes", "alpha_rest"} | ({"offset"} if method == "offset" else set())
    assert buffers == expected
    assert model[0].packed_codes.dtype == torch.uint8


def test_prepare_with_all_alpha_and_offset() -> None:
    model = nn.Sequential(_layer("offset", True, 64, 16))
    prepare_for_alphatuning(model, AlphaTuningConfig(train="all_alpha", train_offset=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["0.alpha1", "0.alpha_rest", "0.offset"]


def _gradcheck_inputs(group_size: int | None, with_offset: bool, lead: tuple[int, ...]):
    generator = torch.Generator().manual_seed(11)
    bits, out, in_features = 3, 3, 20
    g = in_features if group_size is None else group_size
    codes = torch.randint(0, 2, (bits, out, in_features), generator=generator) * 2 - 1
    x = torch.randn(*lead, in_features, generator=generator, dtype=torch.float64)
    alpha = torch.rand(bits, out, in_features // g, generator=generator, dtype=torch.float64)
    offset = torch.randn(out, in_features // g, generator=generator, dtype=torch.float64)
    alpha1, alpha_rest = alpha[0].clone(), alpha[1:].clone()
    return pack_codes(codes), x, alpha1, alpha_rest, offset if with_offset else None, g, codes


@pytest.mark.parametrize("lead", [(4,), (2, 3)], ids=lambda s: f"x={(*s, 'in')}")
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("group_size", [None, 10, 5], ids=lambda g: f"group={g or 'row'}")
def test_gradcheck(group_size: int | None, with_offset: bool, lead: tuple[int, ...]) -> None:
    packed, x, alpha1, alpha_rest, offset, g, _ = _gradcheck_inputs(group_size, with_offset, lead)
    in_features = x.shape[-1]
    inputs = [x, alpha1, alpha_rest] + ([offset] if with_offset else [])
    for t in inputs:
        t.requires_grad_(True)

    def function(x, alpha1, alpha_rest, offset=None):
        return BCQMatmul.apply(x, packed, alpha1, alpha_rest, offset, g, in_features)

    assert torch.autograd.gradcheck(function, tuple(inputs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("needs", ["x", "alpha1", "alpha_rest", "offset"])
def test_gradcheck_one_input_at_a_time(needs: str) -> None:
    """Backward computes only what is asked (e.g. plane 0 alone for alpha1); each part is right."""
    packed, x, alpha1, alpha_rest, offset, g, _ = _gradcheck_inputs(10, True, (4,))
    named = {"x": x, "alpha1": alpha1, "alpha_rest": alpha_rest, "offset": offset}
    named[needs].requires_grad_(True)

    def function(t):
        args = {**named, needs: t}
        return BCQMatmul.apply(
            args["x"], packed, args["alpha1"], args["alpha_rest"], args["offset"], g, 20
        )

    assert torch.autograd.gradcheck(function, (named[needs],), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_scale_gradients_match_the_dense_formula(method: str) -> None:
    layer = _layer(method, True, 100, 20)
    layer.make_trainable(alpha_rest=True, offset=True)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 100, generator=generator, requires_grad=True)
    dy = torch.randn(2, 5, OUT, generator=generator)
    (layer(x) * dy).sum().backward()

    alpha = layer.alpha.detach().clone().requires_grad_(True)
    offset = None if layer.offset is None else layer.offset.detach().clone().requires_grad_(True)
    x_dense = x.detach().clone().requires_grad_(True)
    weight = bcq.dequantize(layer.codes(), alpha, offset, layer.group_size)
    (F.linear(x_dense, weight, layer.bias.detach()) * dy).sum().backward()

    torch.testing.assert_close(layer.alpha1.grad, alpha.grad[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.alpha_rest.grad, alpha.grad[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-4, atol=1e-4)
    if offset is not None:
        torch.testing.assert_close(layer.offset.grad, offset.grad, rtol=1e-4, atol=1e-4)


def test_one_bit_layer_trains() -> None:
    """q = 1 leaves alpha_rest empty; forward and backward still work."""
    layer = BCQLinear.from_linear(
        nn.Linear(24, OUT), BCQConfig(bits=1, group_size=8, method="greedy")
    )
    assert layer.alpha_rest.shape == (0, OUT, 3)
    x = torch.randn(4, 24)
    y = layer(x)
    torch.testing.assert_close(y.detach(), F.linear(x, layer.dequantize(), layer.bias).detach())
    y.sum().backward()
    assert layer.alpha1.grad is not None and layer.alpha1.grad.shape == (OUT, 3)


@pytest.mark.parametrize("method", METHODS)
def test_make_trainable_keeps_state_dict_keys(method: str) -> None:
    layer = _layer(method, True, 64, 16)
    before = layer.state_dict()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        y_before = layer(x)
    layer.make_trainable(alpha_rest=True, offset=True)
    after = layer.state_dict()
    assert set(after) == set(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert isinstance(layer.alpha_rest, nn.Parameter)
    assert isinstance(layer.offset, nn.Parameter) == (method == "offset")
    layer.load_state_dict(before)  # strict: an old state dict still loads
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y_before, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_is_accepted() -> None:
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(5)
    conv = conv1d(nf=OUT, nx=64)  # weight stored (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = BCQLinear.from_linear(conv, BCQConfig(bits=4, group_size=16, method="offset"))
    assert (layer.in_features, layer.out_features) == (64, OUT)
    assert bcq.sqnr_db(conv.weight.T, layer.dequantize()) > 15.0
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert bcq.sqnr_db(conv(x), layer(x)) > 15.0
        torch.testing.assert_close(layer.bias, conv.bias)
    y = layer(x)  # autograd path: dequantize + F.linear, then the bias
    assert torch.equal(y.detach(), F.linear(x, layer.dequantize().detach()) + layer.bias.detach())


def test_calibrated_method_is_refused() -> None:
    with pytest.raises(ConfigError, match="calibrat"):
        BCQLinear.from_linear(nn.Linear(16, 4), BCQConfig(bits=2, method="calibrated"))


def test_group_size_not_dividing_is_refused() -> None:
    with pytest.raises(ConfigError, match="divide"):
        BCQLinear.from_linear(nn.Linear(100, 4), BCQConfig(bits=2, group_size=16, method="greedy"))


def test_other_modules_are_refused() -> None:
    with pytest.raises(ConfigError, match="Conv2d"):
        BCQLinear.from_linear(nn.Conv2d(3, 3, 1), BCQConfig(bits=2, method="greedy"))


def test_storage_bytes_counts_packed_codes_and_fp16_scales() -> None:
    layer = BCQLinear.from_linear(
        nn.Linear(100, 40), BCQConfig(bits=3, group_size=25, method="offset")
    )
    codes = 3 * 40 * 13  # ceil(100 / 8) bytes per row and plane
    scales = 2 * (3 * 40 * 4 + 40 * 4)  # fp16 alpha (q, out, G) + offset (out, G)
    assert layer.storage_bytes() == codes + scales


@pytest.mark.skipif(not kernels.lut_available(), reason="no LUT kernel on this CPU (AVX2 + FMA)")
def test_inference_keeps_the_kernel_layout_not_a_dense_weight() -> None:
    """Decode runs on the LUT layout (~ the codes' size); no 32-bit dense copy is ever kept."""
    layer = _layer("offset", True, 64, 16).eval()
    with torch.no_grad():
        one = layer(torch.ones(1, 64))
        many = layer(torch.ones(2 * kernels.LUT_MAX_TOKENS, 64))
    assert "lut_codes" in layer._weight_cache and "dense" not in layer._weight_cache
    torch.testing.assert_close(one, many[:1], rtol=1e-5, atol=1e-5)
    layer.release_weight_cache()
    assert "lut_codes" not in layer._weight_cache
