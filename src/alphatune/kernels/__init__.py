"""Kernel dispatch: the only place that chooses between backends.

On CPU, with numba and a LUT kernel for this CPU (``lut_kernel()``: ``avx2_lut`` with int16
tables on AVX2 + FMA, AVX-512 CPUs included, where it measured faster than
``avx512_lut``):

- decode (up to ``LUT_MAX_TOKENS`` tokens): LUT-GEMV straight on the codes, in a kernel layout
  that the layer keeps (``WeightCache``; about the size of the codes, ~3 bits per weight);
- more tokens (prefill, evaluation, training): dequantize (numba, parallel) and one ``F.linear``.
  The dense weight is not kept: decode never needs it, and keeping it would cost 32 bits per weight.

Without a LUT kernel (x86 without AVX2, ARM, numba missing, or ``ALPHATUNE_KERNEL=reference``):
the dense weight is dequantized once (numba when present) and kept in the layer's cache, then
``F.linear``. On CUDA: the torch reference dequantization and ``F.linear``.

``ALPHATUNE_KERNEL`` (read at every call) forces a decode kernel: ``avx512`` (float tables),
``avx2-int16`` (int16 tables, the default: within ~1e-4 of float32, perplexity unchanged to
1e-5 and no top-1 change over 4,088 WikiText-2 positions, ``benchmarks/bench_table_precision.py``),
``avx2`` (float32 tables, exact up to summation order, slower), ``avx2-int8`` (int8 tables:
fastest, approximate: +0.1-0.4% perplexity), ``reference`` (none), or ``auto`` (the default).
Forcing a kernel this CPU cannot run is an error, not a silent fallback. The choice itself is
``alphatune_runtime.dispatch``'s (the torch-free runtime decodes on the same kernel).

Every matmul kernel has the signature of ``reference.bcq_matmul_reference``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alphatune.kernels import avx2_lut, avx512_lut, lut_common, numba_dequant
from alphatune.kernels.reference import (
    bcq_matmul_dequant,
    bcq_matmul_mixed_reference,
    bcq_matmul_reference,
    binary_products,
)
from alphatune.kernels.reference import dequantize_packed as dequantize_packed_reference
from alphatune.packing import unpack_codes
from alphatune_runtime import avx512, dispatch
from alphatune_runtime.dispatch import NativeKernel

logger = logging.getLogger(__name__)

# Up to this many tokens the LUT-GEMV beats dequantize + GEMM: measured one thread, q = 3, at
# T = 1..64 on SmolLM2's layer shapes (LUT 1.3-2x faster at T = 32, about even at T = 64) and at
# 4096² (LUT 2.3x faster at T = 32, 1.7x at T = 64).
LUT_MAX_TOKENS = 64

KERNEL_ENV = dispatch.KERNEL_ENV

__all__ = [
    "KERNEL_ENV",
    "LUT_MAX_TOKENS",
    "WeightCache",
    "bcq_matmul",
    "bcq_matmul_dequant",
    "bcq_matmul_mixed",
    "bcq_matmul_mixed_reference",
    "bcq_matmul_reference",
    "binary_products",
    "decode_kernel",
    "dequantize_packed",
    "dequantize_packed_reference",
    "dequantized_linear",
    "lut_available",
    "lut_kernel",
    "unpack_signs",
]


@dataclass(frozen=True)
class _LutKernel:
    """A LUT-GEMV kernel: its torch module (``prepare_codes``, ``prepare_scales``, ``decoder``),
    what a numba caller uses of it (``native``: ``alphatune_runtime.dispatch.NativeKernel``) and
    the table precision it runs with (AVX2 only)."""

    native: NativeKernel
    module: ModuleType
    table_dtype: torch.dtype | None = None

    @property
    def name(self) -> str:
        return self.native.name

    @property
    def table_bits(self) -> int:
        """What the AVX2 kernel's numba entry takes for this precision (0 for float32 tables)."""
        return self.native.table_bits

    def decoder(
        self, codes: Any, scales: Any, offset: Tensor | None, group_size: int
    ) -> Callable[[Tensor, Tensor | None], Tensor]:
        precision = () if self.table_dtype is None else (self.table_dtype,)
        return self.module.decoder(codes, scales, offset, group_size, *precision)


def _torch_face(native: NativeKernel) -> _LutKernel:
    """The torch face of a kernel of ``dispatch.KERNELS``: its module, and for AVX2 the tables'
    dtype that gives its ``table_bits``."""
    if native.module is avx512:
        return _LutKernel(native, avx512_lut)
    dtype = {bits: dtype for dtype, bits in avx2_lut.TABLE_BITS.items()}[native.table_bits]
    return _LutKernel(native, avx2_lut, dtype)


_LUT_KERNELS = {name: _torch_face(native) for name, native in dispatch.KERNELS.items()}
AVX2_DEFAULT = dispatch.AVX2_DEFAULT


def _chosen_lut_kernel() -> _LutKernel | None:
    """The LUT kernel for decode here (``alphatune_runtime.dispatch`` chooses it)."""
    native = dispatch.chosen_kernel()
    return None if native is None else _LUT_KERNELS[native.name]


def lut_kernel() -> str | None:
    """The LUT kernel decode runs on here: ``"avx512"``, ``"avx2"``, ``"avx2-int16"``,
    ``"avx2-int8"``, or None.

    The best one this CPU runs (AVX2 + FMA with numba: int16 tables), unless ``ALPHATUNE_KERNEL``
    forces one; None means decode dequantizes and keeps the dense weight (see the module doc).
    """
    kernel = _chosen_lut_kernel()
    return None if kernel is None else kernel.name


def decode_kernel() -> _LutKernel | None:
    """The LUT kernel decode runs on here, as an object: ``name``, ``module`` (``avx512_lut`` or
        ``avx2_lut``), ``native`` (its ``NativeKernel``: ``native.module.decode_native`` is what a numba
    caller calls) and
        ``table_dtype``; None
        where ``lut_kernel()`` is None. For native callers (``alphatune.engine``)."""
    return _chosen_lut_kernel()


def reference_forced() -> bool:
    """Whether ``ALPHATUNE_KERNEL=reference`` asks for the plain torch paths everywhere."""
    return dispatch.kernel_setting()[1] == "reference"


def lut_available() -> bool:
    """Whether decode runs on a LUT kernel here (see ``lut_kernel``)."""
    return _chosen_lut_kernel() is not None


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
        # Keep the dense weight of the batched path too (``bcq_matmul``): for a caller that runs
        # many large batches through the same weights (calibration), one dequantization in all
        # instead of one per batch, at 32 bits per weight while it is set.
        self.keep_dense = False

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


def _lut_for(x: Tensor, tokens: int, group_size: int, in_features: int) -> _LutKernel | None:
    """The LUT kernel for this call, or None (not CPU, too many tokens, groups split a byte)."""
    if not x.is_cpu or tokens > LUT_MAX_TOKENS or not lut_common.supports(group_size, in_features):
        return None
    return _chosen_lut_kernel()


def _lut_decoder(
    kernel: _LutKernel,
    cache: WeightCache | None,
    name: str,
    cache_key: tuple[object, ...],
    packed: Tensor,
    in_features: int,
    build_scales: Callable[[], Any],
    offset: Tensor | None,
    group_size: int,
) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The layer's decode call on ``kernel`` (its checks done once), kept in ``cache`` under
    ``name`` while ``cache_key`` holds. The prepared codes are kept apart, shared by the single-
    and mixed-task decoders; both are keyed by the kernel, as each kernel has its own layout."""

    def build() -> Callable[[Tensor, Tensor | None], Tensor]:
        codes = _cached(
            cache,
            "lut_codes",
            (_tensor_key(packed), kernel.module.__name__),
            lambda: kernel.module.prepare_codes(packed, in_features),
        )
        return kernel.decoder(codes, build_scales(), offset, group_size)

    return _cached(cache, name, (*cache_key, _tensor_key(packed), kernel.name), build)


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

    ``cache`` (with a key that changes whenever the scales or the offset change) keeps the
    prepared forms of the weight between calls.
    """
    flat = x if x.dim() == 2 else x.reshape(-1, in_features)
    kernel = _lut_for(x, flat.shape[0], group_size, in_features)
    if kernel is not None:
        decode = _lut_decoder(
            kernel,
            cache,
            "lut_decoder",
            cache_key,
            packed,
            in_features,
            lambda: kernel.module.prepare_scales(alpha[:1], alpha[1:]),
            offset,
            group_size,
        )
        y = decode(flat, None)
        # Decode makes ~200 of these calls per token: no tensor op that would change nothing.
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], packed.shape[1])
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def build() -> Tensor:
        return dequantize_packed(packed, alpha, offset, group_size, in_features).to(x.dtype)

    keep = cache is not None and cache.keep_dense  # a pass of many batches: dequantize once
    if not keep and x.device.type == "cpu" and alpha.dtype == torch.float32 and lut_available():
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
    bank, the other scales or the offset change.
    """
    kernel = _lut_for(x, x.shape[0], group_size, in_features)
    if kernel is None:
        # Many tokens: each adapter's rows through its own weight, not kept (one GEMM's worth
        # of work in all, plus one dequantization per adapter).
        y = x.new_empty(x.shape[0], packed.shape[1])
        for adapter in token_adapter.unique().tolist():
            rows = token_adapter == adapter
            alpha = torch.cat([alpha1_bank[adapter][None], alpha_rest])
            y[rows] = dequantized_linear(x[rows], packed, alpha, offset, group_size, in_features)
        return y

    decode = _lut_decoder(
        kernel,
        cache,
        "lut_mixed_decoder",
        cache_key,
        packed,
        in_features,
        lambda: kernel.module.prepare_scales(alpha1_bank, alpha_rest),
        offset,
        group_size,
    )
    y = decode(x, token_adapter)
    return y if y.dtype == x.dtype else y.to(x.dtype)
