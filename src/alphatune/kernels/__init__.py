"""Kernel dispatch: the only place that chooses between backends.

- a layer that keeps a dense cache (the default): dequantize once, reuse, ``F.linear``. Measured
  faster than today's LUT-GEMV at batch 1 (benchmarks/bench_kernels.py), at the cost of memory;
- no cache, a few tokens, CPU, numba present: LUT-GEMV straight on the packed codes;
- anything else: dequantize and call ``F.linear`` (the torch path, also used on CUDA).

Every kernel has the signature of ``reference.bcq_matmul_reference``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from alphatune.kernels.reference import (
    bcq_matmul_dequant,
    bcq_matmul_mixed_reference,
    bcq_matmul_reference,
    binary_products,
    dequantize_packed,
)

logger = logging.getLogger(__name__)

# Up to this many tokens the LUT-GEMV beats dequantize + GEMM (decode, small batches).
LUT_MAX_TOKENS = 4

__all__ = [
    "DenseCache",
    "bcq_matmul",
    "bcq_matmul_dequant",
    "bcq_matmul_mixed",
    "bcq_matmul_mixed_reference",
    "bcq_matmul_reference",
    "binary_products",
    "dequantize_packed",
]


def _lut_kernel():
    try:
        from alphatune.kernels import numba_lut
    except ImportError:
        return None
    return numba_lut if numba_lut.numba_available() else None


class DenseCache:
    """One layer's dequantized weight, reused while its scales are unchanged.

    The key holds the scales' in-place version counters, which every optimizer step and
    ``load_state_dict`` bump, so a stale weight is never used.
    """

    def __init__(self) -> None:
        self.key: tuple[object, ...] | None = None
        self.weight: Tensor | None = None

    def get(self, key: tuple[object, ...], build: Callable[[], Tensor]) -> Tensor:
        if self.key != key or self.weight is None:
            self.weight, self.key = build(), key
        return self.weight

    def clear(self) -> None:
        self.key = self.weight = None


def bcq_matmul(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
    cache: DenseCache | None = None,
    cache_key: tuple[object, ...] = (),
) -> Tensor:
    """``y = x Ŵᵀ`` for a BCQ weight, on the fastest available backend (no bias, no autograd).

    ``cache`` (with a key that changes whenever the scales change) keeps the dense weight of the
    dequantize path between calls.
    """
    tokens = x.numel() // in_features
    if cache is None and x.device.type == "cpu" and tokens <= LUT_MAX_TOKENS:
        lut = _lut_kernel()
        if lut is not None and lut.supports(group_size, in_features):
            return lut.bcq_matmul_lut(x, packed, alpha, offset, group_size, in_features)

    def build() -> Tensor:
        return dequantize_packed(packed, alpha, offset, group_size, in_features).to(x.dtype)

    weight = build() if cache is None else cache.get((*cache_key, x.device, x.dtype), build)
    return F.linear(x, weight)


def bcq_matmul_mixed(
    x: Tensor,
    packed: Tensor,
    alpha1_bank: Tensor,
    token_adapter: Tensor,
    alpha_rest: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> Tensor:
    """``y = x Ŵᵀ`` where token ``t`` has its own first scale ``alpha1_bank[token_adapter[t]]``.

    The binary codes are shared by every task; only α₁ differs. x (T, in) -> (T, out), no bias,
    no autograd. Contract: ``reference.bcq_matmul_mixed_reference``.
    """
    return bcq_matmul_mixed_reference(
        x, packed, alpha1_bank, token_adapter, alpha_rest, offset, group_size, in_features
    )
