"""Training-time BCQ matmul: a custom autograd function with exact gradients for the scales.

The gradient of ``alpha_i[r, k]`` is ``Σ_t dy[t, r] · (B_i[r, group k] x_t[group k])`` (DESIGN.md
section 2). Two formulations compute it, with the same FLOPs (one ``T × in × out`` product):

- ``products``: ``B_i x`` per input group, ``(p, G, T, out)``, then multiply by ``dy`` and sum
  the tokens. Its temporary grows with the tokens: ``p · G · T · out`` elements.
- ``outer``: the dense weight gradient ``dyᵀx`` ``(out, in)``, one plain GEMM, then
  ``Σ_group B_i ⊙ dyᵀx``. Its temporary is ``out · in`` elements (+ ``p · out · in`` for the
  product with the codes, the size of the unpacked codes both formulations already hold).

``choose_alpha_grad`` picks one per call from the tokens ``T`` and the group size ``g``: ``outer``
when ``T >= g``, where its temporary is the smaller one and it measured as fast or faster.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alphatune import kernels


class AlphaGrad(str, Enum):
    """How ``BCQMatmul.backward`` forms the scale gradients (see the module docstring)."""

    PRODUCTS = "products"
    OUTER = "outer"


# ``outer`` from ``T / g`` this large on, i.e. from as many tokens as a group has inputs. There the
# two temporaries are the same size (``T · G · out = in · out``), and the measured crossover sits
# there too (CPU, benchmarks/bench_alpha_grad.py, results/alpha_grad.json): well below it
# ``products`` wins (4.5x at 4096x4096 with 16 tokens), from it on ``outer`` won at every shape
# (2.3x at 4096x4096 and 1.2-2.8x on SmolLM2-135M's layers with 1024 tokens). Just below T = g
# (T/g 0.67-0.89) the two were within 15%; at T = g/2 ``products`` was still 1.7x faster at
# 4096x4096, so a lower threshold would lose more than it could win.
OUTER_MIN_TOKENS_OVER_GROUP = 1.0


def choose_alpha_grad(tokens: int, group_size: int) -> AlphaGrad:
    """The faster scale-gradient formulation for ``tokens`` rows of x and groups of ``group_size``.

    ``outer`` when ``tokens >= OUTER_MIN_TOKENS_OVER_GROUP * group_size``, else ``products``: the
    one with the smaller temporary (for α₁; with every plane ``outer`` shares one ``dyᵀx``), which
    measured the faster one as well, so the choice never costs memory. Row-wise scales (``g = in``)
    use ``products`` below ``in`` tokens; a training batch of 8 x 128 tokens with groups of ~128
    uses ``outer``.
    """
    if tokens >= OUTER_MIN_TOKENS_OVER_GROUP * group_size:
        return AlphaGrad.OUTER
    return AlphaGrad.PRODUCTS


def alpha_grad_products(x: Tensor, dy: Tensor, codes: Tensor, group_size: int) -> Tensor:
    """Scale gradients from the per-group products ``B_i x``.

    x (T, in), dy (T, out), codes (p, out, in) ±1 in x's dtype -> (p, out, G).
    """
    products = kernels.binary_products(x, codes, group_size)  # (p, G, T, out)
    # Multiply-and-reduce over tokens; measured 1.8-3.8x faster than the same einsum.
    return (products * dy).sum(dim=2).transpose(1, 2)


def alpha_grad_outer(x: Tensor, dy: Tensor, codes: Tensor, group_size: int) -> Tensor:
    """Scale gradients from the dense weight gradient ``dyᵀx``, summed per group.

    x (T, in), dy (T, out), codes (p, out, in) ±1 in x's dtype -> (p, out, G).
    """
    planes, out, _ = codes.shape
    grad_weight = (dy.T @ x).view(1, out, -1, group_size)  # (1, out, G, g)
    return (codes.view(planes, out, -1, group_size) * grad_weight).sum(-1)  # (p, out, G)


_ALPHA_GRAD = {AlphaGrad.PRODUCTS: alpha_grad_products, AlphaGrad.OUTER: alpha_grad_outer}


class BCQMatmul(torch.autograd.Function):
    """``y = Σ_i alpha_i ⊙ (B_i x) (+ offset·Σx)`` with exact scale gradients.

    Backward forms the scale gradients only for the planes that need one, with the formulation
    ``choose_alpha_grad`` picks (or ``alpha_grad`` when given: tests and benchmarks). The dense
    weight of the forward is kept for ``dx`` (one layer's worth of memory per layer).

    Args (of ``apply``): x ``(..., in)``; packed ``(q, out, ceil(in/8))`` uint8; alpha1
    ``(out, G)``; alpha_rest ``(q-1, out, G)``; offset ``(out, G)`` or ``None``; group_size;
    in_features; alpha_grad ``AlphaGrad`` or ``None`` (choose by shape); grad_scale, a factor
    applied to the scale and offset gradients (the paper's Eq. 4 uses ``1 / group_size``).
    Returns ``(..., out)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        packed: Tensor,
        alpha1: Tensor,
        alpha_rest: Tensor,
        offset: Tensor | None,
        group_size: int,
        in_features: int,
        alpha_grad: AlphaGrad | str | None = None,
        grad_scale: float = 1.0,
    ) -> Tensor:
        alpha = torch.cat([alpha1[None], alpha_rest])  # (q, out, G)
        weight = kernels.dequantize_packed(packed, alpha, offset, group_size, in_features)
        ctx.save_for_backward(x, packed, weight)
        ctx.group_size, ctx.in_features = group_size, in_features
        ctx.alpha_grad = None if alpha_grad is None else AlphaGrad(alpha_grad)
        ctx.grad_scale = grad_scale
        return F.linear(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, dy: Tensor):  # type: ignore[override]
        x, packed, weight = ctx.saved_tensors
        g, in_features = ctx.group_size, ctx.in_features
        need_x, _, need_a1, need_rest, need_offset = ctx.needs_input_grad[:5]
        dtype = weight.dtype
        flat_x = x.reshape(-1, in_features).to(dtype)  # (T, in)
        flat_dy = dy.reshape(-1, dy.shape[-1]).to(dtype)  # (T, out)

        grad_x = grad_a1 = grad_rest = grad_offset = None
        if need_x:
            grad_x = (flat_dy @ weight).reshape(x.shape).to(x.dtype)
        if need_a1 or need_rest:
            planes = slice(0, 1) if not need_rest else slice(0, packed.shape[0])
            codes = kernels.unpack_signs(packed[planes], in_features, dtype)  # (p, out, in)
            method = ctx.alpha_grad or choose_alpha_grad(flat_x.shape[0], g)
            grad_planes = _ALPHA_GRAD[method](flat_x, flat_dy, codes, g)  # (p, out, G)
            if ctx.grad_scale != 1.0:
                grad_planes = grad_planes * ctx.grad_scale
            grad_a1 = grad_planes[0] if need_a1 else None
            grad_rest = grad_planes[1:] if need_rest else None
        if need_offset:
            group_sums = flat_x.reshape(flat_x.shape[0], -1, g).sum(-1)  # (T, G)
            grad_offset = (flat_dy.T @ group_sums) * ctx.grad_scale  # (out, G)
        return grad_x, None, grad_a1, grad_rest, grad_offset, None, None, None, None
