"""Plain torch BCQ matmul: the definition of correct for every fast kernel.

All kernels share one signature::

    kernel(x, packed, alpha, offset, group_size, in_features) -> y

    x:       (..., in) float
    packed:  (q, out, ceil(in/8)) uint8 codes (layout: ``alphatune.packing``)
    alpha:   (q, out, in // group_size) float
    offset:  (out, in // group_size) float, or None
    y:       (..., out) in x's dtype (no bias; the layer adds it)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alphatune.bcq import dequantize
from alphatune.packing import unpack_codes


def dequantize_packed(
    packed: Tensor, alpha: Tensor, offset: Tensor | None, group_size: int, in_features: int
) -> Tensor:
    """Dense ``(out, in)`` weight in alpha's dtype from packed codes."""
    codes = unpack_codes(packed, in_features, dtype=alpha.dtype)
    return dequantize(codes, alpha, offset, group_size)


def binary_products(x: Tensor, codes: Tensor, group_size: int) -> Tensor:
    """``B_i x`` per code plane and input group: the quantities α multiplies.

    x (T, in), codes (q, out, in) ±1 in x's dtype -> (q, G, T, out).
    """
    bits, out, in_features = codes.shape
    groups = in_features // group_size
    x_grouped = x.reshape(-1, groups, group_size).transpose(0, 1)  # (G, T, g)
    codes_grouped = codes.reshape(bits, out, groups, group_size).permute(
        0, 2, 3, 1
    )  # (q, G, g, out)
    return x_grouped[None] @ codes_grouped  # (q, G, T, out)


def bcq_matmul_reference(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> Tensor:
    """``y = Σ_i Σ_k alpha[i, :, k] ⊙ (B_i[:, group k] x[group k]) (+ offset[:, k]·Σ x[group k])``.

    The literal formula of the paper (section 3), evaluated plane by plane.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, in_features).to(alpha.dtype)
    codes = unpack_codes(packed, in_features, dtype=alpha.dtype)
    products = binary_products(flat, codes, group_size)  # (q, G, T, out)
    y = (products * alpha.permute(0, 2, 1)[:, :, None, :]).sum(dim=(0, 1))  # (T, out)
    if offset is not None:
        group_sums = flat.reshape(flat.shape[0], -1, group_size).sum(-1)  # (T, G)
        y = y + group_sums @ offset.T
    return y.reshape(*lead, -1).to(x.dtype)


def bcq_matmul_dequant(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> Tensor:
    """Same result as the reference through one dense weight and ``F.linear`` (faster for T > 1)."""
    weight = dequantize_packed(packed, alpha, offset, group_size, in_features).to(x.dtype)
    return F.linear(x, weight)


def bcq_matmul_mixed_reference(
    x: Tensor,
    packed: Tensor,
    alpha1_bank: Tensor,
    token_adapter: Tensor,
    alpha_rest: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> Tensor:
    """A mixed-task batch: token ``t`` uses ``alpha1_bank[token_adapter[t]]`` as its first scale.

    x (T, in); alpha1_bank (A, out, G); token_adapter (T,) int64 in [0, A); alpha_rest (q-1, out, G).
    Tokens are grouped by adapter and each group goes through its own dense weight.
    """
    y = x.new_empty(x.shape[0], packed.shape[1])
    for adapter in token_adapter.unique().tolist():
        rows = token_adapter == adapter
        alpha = torch.cat([alpha1_bank[adapter][None], alpha_rest])
        y[rows] = bcq_matmul_dequant(x[rows], packed, alpha, offset, group_size, in_features)
    return y
