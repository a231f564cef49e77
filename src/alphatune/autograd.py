"""Training-time BCQ matmul: a custom autograd function with exact gradients for the scales."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alphatune import kernels
from alphatune.packing import unpack_codes


class BCQMatmul(torch.autograd.Function):
    """``y = Σ_i alpha_i ⊙ (B_i x) (+ offset·Σx)`` with exact scale gradients.

    The gradient of ``alpha_i[r, k]`` is ``Σ_t dy[t, r] · (B_i[r, group k] x_t[group k])``. The
    products ``B_i x`` are recomputed in backward, only for the planes that need a gradient (one
    batched matmul per plane), instead of being stored; no dense weight gradient is formed. The
    dense weight of the forward is kept for ``dx`` (one layer's worth of memory per layer).
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
    ) -> Tensor:
        alpha = torch.cat([alpha1[None], alpha_rest])  # (q, out, G)
        weight = kernels.dequantize_packed(packed, alpha, offset, group_size, in_features)
        ctx.save_for_backward(x, packed, weight)
        ctx.group_size, ctx.in_features = group_size, in_features
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
            codes = unpack_codes(packed[planes], in_features, dtype=dtype)  # (p, out, in)
            products = kernels.binary_products(flat_x, codes, g)  # (p, G, T, out)
            # Multiply-and-reduce over tokens; measured ~4x faster here than the same einsum.
            grad_planes = (products * flat_dy).sum(dim=2).transpose(1, 2)  # (p, out, G)
            grad_a1 = grad_planes[0] if need_a1 else None
            grad_rest = grad_planes[1:] if need_rest else None
        if need_offset:
            group_sums = flat_x.reshape(flat_x.shape[0], -1, g).sum(-1)  # (T, G)
            grad_offset = flat_dy.T @ group_sums  # (out, G)
        return grad_x, None, grad_a1, grad_rest, grad_offset, None, None
