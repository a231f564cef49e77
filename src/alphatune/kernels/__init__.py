"""Kernel dispatch: the only place that chooses between backends.

- batch of a few tokens, no autograd, CPU, numba present: LUT-GEMV on the packed codes;
- anything else: dequantize once and call ``F.linear`` (the torch path, also used on CUDA).

Every kernel has the signature of ``reference.bcq_matmul_reference``.
"""

from __future__ import annotations

import logging

from torch import Tensor

from alphatune.kernels.reference import (
    bcq_matmul_dequant,
    bcq_matmul_reference,
    binary_products,
    dequantize_packed,
)

logger = logging.getLogger(__name__)

# Up to this many tokens the LUT-GEMV beats dequantize + GEMM (decode, small batches).
LUT_MAX_TOKENS = 4

__all__ = [
    "bcq_matmul",
    "bcq_matmul_dequant",
    "bcq_matmul_reference",
    "binary_products",
    "dequantize_packed",
]


def _lut_kernel():  # noqa: ANN202
    try:
        from alphatune.kernels import numba_lut
    except ImportError:
        return None
    return numba_lut if numba_lut.numba_available() else None


def bcq_matmul(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> Tensor:
    """``y = x Ŵᵀ`` for a BCQ weight, on the fastest available backend (no bias, no autograd)."""
    tokens = x.numel() // in_features
    if x.device.type == "cpu" and tokens <= LUT_MAX_TOKENS:
        lut = _lut_kernel()
        if lut is not None and lut.supports(group_size, in_features):
            return lut.bcq_matmul_lut(x, packed, alpha, offset, group_size, in_features)
    return bcq_matmul_dequant(x, packed, alpha, offset, group_size, in_features)
