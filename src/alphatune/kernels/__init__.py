"""Kernel dispatch: the only place that chooses between backends.

On CPU, with numba and AVX-512 (``avx512_lut.available()``):

- decode (up to ``LUT_MAX_TOKENS`` tokens): LUT-GEMV straight on the codes, in a kernel layout
  that the layer keeps (``WeightCache``; about the size of the codes, ~3 bits per weight);
- more tokens (prefill, evaluation, training): dequantize (numba, parallel) and one ``F.linear``.
  The dense weight is not kept: decode never needs it, and keeping it would cost 32 bits per weight.

On CPU without AVX-512: the dense weight is dequantized once (numba when present) and kept in the
layer's cache, then ``F.linear`` — the fastest path there, at the cost of memory. Elsewhere (CUDA,
no numba): the torch reference dequantization and ``F.linear``.

Every matmul kernel has the signature of ``reference.bcq_matmul_reference``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alphatune.kernels import avx512_lut, numba_dequant
from alphatune.kernels.reference import (
    bcq_matmul_dequant,
    bcq_matmul_mixed_reference,
    bcq_matmul_reference,
    binary_products,
)
from alphatune.kernels.reference import dequantize_packed as dequantize_packed_reference
from alphatune.packing import unpack_codes

logger = logging.getLogger(__name__)

# Up to this many tokens the LUT-GEMV beats dequantize + GEMM: measured one thread, q = 3, at
# T = 1..64 on SmolLM2's layer shapes (LUT 1.3-2x faster at T = 32, about even at T = 64) and at
# 4096² (LUT 2.3x faster at T = 32, 1.7x at T = 64).
LUT_MAX_TOKENS = 64

__all__ = [
    "LUT_MAX_TOKENS",
    "WeightCache",
    "bcq_matmul",
    "bcq_matmul_dequant",
    "bcq_matmul_mixed",
    "bcq_matmul_mixed_reference",
    "bcq_matmul_reference",
    "binary_products",
    "dequantize_packed",
    "dequantize_packed_reference",
    "dequantized_linear",
    "unpack_signs",
]


def lut_available() -> bool:
    """Whether decode runs on the LUT kernel here (numba present, AVX-512 CPU)."""
    return avx512_lut.available()


def dequantize_packed(
    packed: Tensor, alpha: Tensor, offset: Tensor | None, group_size: int, in_features: int
) -> Tensor:
    """Dense ``(out, in)`` weight in alpha's dtype: numba on CPU float32, torch elsewhere."""
    if packed.device.type == "cpu" and alpha.dtype == torch.float32 and numba_dequant.available():
        return numba_dequant.dequantize_fast(packed, alpha, offset, group_size, in_features)
    return dequantize_packed_reference(packed, alpha, offset, group_size, in_features)


def unpack_signs(packed: Tensor, in_features: int, dtype: torch.dtype) -> Tensor:
    """±1 codes ``(p, out, in)`` in ``dtype`` (numba on CPU float32, ``packing.unpack_codes`` else).

    The numba path dequantizes each plane with all scales 1, which is several times faster than
    unpacking bit by bit in torch (the training backward needs the codes of every step).
    """
    if packed.device.type == "cpu" and dtype == torch.float32 and numba_dequant.available():
        bits, out, _ = packed.shape
        ones = torch.ones(1, out, 1)
        planes = [
            numba_dequant.dequantize_fast(packed[i : i + 1], ones, None, in_features, in_features)
            for i in range(bits)
        ]
        return torch.stack(planes)
    return unpack_codes(packed, in_features, dtype=dtype)


class WeightCache:
    """Forms of one layer's weight derived from its codes and scales, reused while they hold.

    Every form is stored under a name with a key; the key holds the source tensors' identity and
    in-place version counters (which every optimizer step and ``load_state_dict`` bump), so a
    stale form is never used.
    """

    def __init__(self) -> None:
        self._forms: dict[str, tuple[Hashable, Any]] = {}

    def get(self, name: str, key: Hashable, build: Callable[[], Any]) -> Any:
        held = self._forms.get(name)
        if held is None or held[0] != key:
            value = build()
            self._forms[name] = (key, value)
            return value
        return held[1]

    def clear(self) -> None:
        self._forms.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._forms


def _cached(cache: WeightCache | None, name: str, key: Hashable, build: Callable[[], Any]) -> Any:
    return build() if cache is None else cache.get(name, key, build)


def dequantized_linear(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> Tensor:
    """``F.linear`` through a dequantized weight that is not kept (the batched path).

    On CPU with numba the weight goes into a reused per-thread workspace (``numba_dequant``),
    consumed by this one GEMM; elsewhere the torch reference builds it.
    """
    if packed.device.type == "cpu" and alpha.dtype == torch.float32 and numba_dequant.available():
        weight = numba_dequant.dequantize_fast(
            packed, alpha, offset, group_size, in_features, reuse=True
        )
    else:
        weight = dequantize_packed_reference(packed, alpha, offset, group_size, in_features)
    return F.linear(x, weight.to(x.dtype))


def _tensor_key(t: Tensor) -> tuple[int, int]:
    return (t.data_ptr(), t._version)


def _use_lut(x: Tensor, tokens: int, group_size: int, in_features: int) -> bool:
    return (
        x.device.type == "cpu"
        and tokens <= LUT_MAX_TOKENS
        and avx512_lut.supports(group_size, in_features)
        and avx512_lut.available()
    )


def bcq_matmul(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
    cache: WeightCache | None = None,
    cache_key: tuple[object, ...] = (),
) -> Tensor:
    """``y = x Ŵᵀ`` for a BCQ weight, on the fastest available backend (no bias, no autograd).

    ``cache`` (with a key that changes whenever the scales change) keeps the prepared forms of
    the weight between calls.
    """
    lead = x.shape[:-1]
    flat = x.reshape(-1, in_features)
    if _use_lut(x, flat.shape[0], group_size, in_features):
        codes = _cached(
            cache,
            "lut_codes",
            _tensor_key(packed),
            lambda: avx512_lut.prepare_codes(packed, in_features),
        )
        scales = _cached(
            cache, "lut_scales", cache_key, lambda: avx512_lut.prepare_scales(alpha[:1], alpha[1:])
        )
        y = avx512_lut.lut_matmul(flat, codes, scales, offset, None, group_size)
        return y.reshape(*lead, packed.shape[1]).to(x.dtype)

    def build() -> Tensor:
        return dequantize_packed(packed, alpha, offset, group_size, in_features).to(x.dtype)

    if x.device.type == "cpu" and avx512_lut.available() and alpha.dtype == torch.float32:
        # The LUT kernel serves decode, so a kept dense weight would only cost memory.
        return dequantized_linear(x, packed, alpha, offset, group_size, in_features)
    weight = (
        build() if cache is None else cache.get("dense", (*cache_key, x.device, x.dtype), build)
    )
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
    cache: WeightCache | None = None,
    cache_key: tuple[object, ...] = (),
) -> Tensor:
    """``y = x Ŵᵀ`` where token ``t`` has its own first scale ``alpha1_bank[token_adapter[t]]``.

    The binary codes are shared by every task; only α₁ differs. x (T, in) -> (T, out), no bias,
    no autograd. Contract: ``reference.bcq_matmul_mixed_reference``. On the LUT kernel the codes
    are read once for all tokens, whatever their adapter; ``cache_key`` must change whenever the
    bank or the other scales change.
    """
    if not _use_lut(x, x.shape[0], group_size, in_features):
        # Many tokens: each adapter's rows through its own weight, not kept (one GEMM's worth
        # of work in all, plus one dequantization per adapter).
        y = x.new_empty(x.shape[0], packed.shape[1])
        for adapter in token_adapter.unique().tolist():
            rows = token_adapter == adapter
            alpha = torch.cat([alpha1_bank[adapter][None], alpha_rest])
            y[rows] = dequantized_linear(x[rows], packed, alpha, offset, group_size, in_features)
        return y

    def build_scales() -> Any:
        return avx512_lut.prepare_scales(alpha1_bank, alpha_rest)

    codes = _cached(
        cache,
        "lut_codes",
        _tensor_key(packed),
        lambda: avx512_lut.prepare_codes(packed, in_features),
    )
    scales = _cached(cache, "lut_mixed_scales", cache_key, build_scales)
    y = avx512_lut.lut_matmul(x, codes, scales, offset, token_adapter, group_size)
    return y.to(x.dtype)
