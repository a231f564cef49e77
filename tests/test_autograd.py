"""``BCQMatmul``: both scale-gradient formulations, against each other, autograd and gradcheck."""

from __future__ import annotations

import pytest
import torch

from alphatune import bcq
from alphatune.autograd import (
    OUTER_MIN_TOKENS_OVER_GROUP,
    AlphaGrad,
    BCQMatmul,
    alpha_grad_outer,
    alpha_grad_products,
    choose_alpha_grad,
)
from alphatune.packing import pack_codes

METHODS = [AlphaGrad.PRODUCTS, AlphaGrad.OUTER]
# (in_features, group_size): row-wise, groups that split a code byte (5, 10 of 20; 25 of 100).
LAYOUTS = [(20, 20), (20, 10), (20, 5), (100, 25)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def _layout_id(layout: tuple[int, int]) -> str:
    in_features, group_size = layout
    return f"in={in_features}-g={group_size}"


def _inputs(in_features: int, group_size: int, lead: tuple[int, ...], bits: int = 3, out: int = 3):
    """float64 operands of ``BCQMatmul``: packed codes, x, alpha1, alpha_rest, offset, codes."""
    generator = torch.Generator().manual_seed(in_features + group_size)
    groups = in_features // group_size
    codes = torch.randint(0, 2, (bits, out, in_features), generator=generator) * 2 - 1
    x = torch.randn(*lead, in_features, generator=generator, dtype=torch.float64)
    alpha = torch.rand(bits, out, groups, generator=generator, dtype=torch.float64)
    offset = torch.randn(out, groups, generator=generator, dtype=torch.float64)
    return pack_codes(codes), x, alpha[0].clone(), alpha[1:].clone(), offset, codes


@pytest.mark.parametrize("planes", [1, 3], ids=lambda p: f"planes={p}")
@pytest.mark.parametrize("tokens", [1, 7, 60], ids=lambda t: f"T={t}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_formulations_agree_with_autograd(layout: tuple[int, int], tokens: int, planes: int):
    """Both give ``d(Σ dy ⊙ y)/dalpha`` of the dense formula, in float64 to rounding."""
    in_features, group_size = layout
    _, x, alpha1, alpha_rest, _, codes = _inputs(in_features, group_size, (tokens,))
    dy = torch.randn(tokens, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha = torch.cat([alpha1[None], alpha_rest]).requires_grad_(True)
    weight = bcq.dequantize(codes.to(torch.float64), alpha, None, group_size)
    (x @ weight.T * dy).sum().backward()
    expected = alpha.grad[:planes]

    plane_codes = codes[:planes].to(torch.float64)
    products = alpha_grad_products(x, dy, plane_codes, group_size)
    outer = alpha_grad_outer(x, dy, plane_codes, group_size)
    assert products.shape == outer.shape == (planes, 3, in_features // group_size)
    torch.testing.assert_close(products, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outer, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no_offset"])
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=_layout_id)
def test_gradcheck_each_formulation(
    layout: tuple[int, int], with_offset: bool, method: AlphaGrad
) -> None:
    in_features, group_size = layout
    packed, x, alpha1, alpha_rest, offset, _ = _inputs(in_features, group_size, (2, 3))
    inputs = [x, alpha1, alpha_rest] + ([offset] if with_offset else [])
    for t in inputs:
        t.requires_grad_(True)

    def function(x, alpha1, alpha_rest, offset=None):
        return BCQMatmul.apply(
            x, packed, alpha1, alpha_rest, offset, group_size, in_features, method
        )

    assert torch.autograd.gradcheck(function, tuple(inputs), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_gradcheck_alpha1_alone(method: AlphaGrad) -> None:
    """The default AlphaTuning case: only plane 0's gradient is formed."""
    packed, x, alpha1, alpha_rest, offset, _ = _inputs(20, 10, (4,))
    alpha1.requires_grad_(True)

    def function(alpha1):
        return BCQMatmul.apply(x, packed, alpha1, alpha_rest, offset, 10, 20, method.value)

    assert torch.autograd.gradcheck(function, (alpha1,), eps=1e-6, atol=1e-6)


def test_the_rule_switches_at_the_threshold() -> None:
    for group_size in (5, 128, 576):
        threshold = OUTER_MIN_TOKENS_OVER_GROUP * group_size
        assert choose_alpha_grad(max(1, int(threshold) - 1), group_size) == AlphaGrad.PRODUCTS
        assert choose_alpha_grad(int(threshold) + 1, group_size) == AlphaGrad.OUTER
        assert choose_alpha_grad(100 * group_size, group_size) == AlphaGrad.OUTER
    assert choose_alpha_grad(1, 128) == AlphaGrad.PRODUCTS  # decoding-sized batches


@pytest.mark.parametrize("tokens", [1, 40], ids=lambda t: f"T={t}")
def test_default_choice_matches_both_forced(tokens: int) -> None:
    """Without ``alpha_grad`` backward uses the rule's pick; every choice gives one answer."""
    in_features, group_size = 100, 25  # T=1: products, T=40: outer (threshold 12.5)
    packed, x, alpha1, alpha_rest, offset, _ = _inputs(in_features, group_size, (tokens,))
    dy = torch.randn(tokens, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for method in (None, *METHODS):
        a1, rest = alpha1.clone().requires_grad_(True), alpha_rest.clone().requires_grad_(True)
        y = BCQMatmul.apply(x, packed, a1, rest, offset, group_size, in_features, method)
        (y * dy).sum().backward()
        grads[method] = (a1.grad, rest.grad)
    for method in METHODS:
        torch.testing.assert_close(grads[None], grads[method], rtol=1e-12, atol=1e-12)
