"""Which LUT kernel decodes here: the one owner of that choice (``alphatune.kernels`` asks it too).

``chosen_kernel()`` is ``ALPHATUNE_KERNEL`` (read at every call) or, by default (``auto``), the
best kernel this CPU runs: ``avx2-int16`` (AVX2 + FMA with int16 tables: within ~1e-4 of
float32, perplexity unchanged to 1e-5, ``benchmarks/bench_table_precision.py``), else none. It is
the default on AVX-512 CPUs too: on an Intel Xeon with AVX-512 the engine decoded at 65.8 / 124.6
tokens/s (1 / 2 threads) on it against 64.0 / 97.8 on ``avx512``'s float tables
(``benchmarks/results/decode-xeon-tables.json``, one quiet run). ``avx512`` (float tables),
``avx2`` (float32 tables, exact up to summation order, slower) and ``avx2-int8`` (fastest, +0.1-0.4%
perplexity) are chosen by name; ``reference`` asks for none
(the plain torch paths in ``alphatune``). Forcing a kernel this CPU cannot run is an error, not a
silent fallback.

A ``NativeKernel`` is what a numba caller needs of the chosen one: its module (``avx2`` /
``avx512``: ``decode_native``), its table precision and how to lay a layer out for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from alphatune_runtime import avx2, avx512, layout, lut
from alphatune_runtime.errors import ConfigError, KernelUnavailableError, UnsupportedModelError

KERNEL_ENV = "ALPHATUNE_KERNEL"
# The AVX2 tables decode runs on by default: int16 is ~1.6x faster per layer than float32 and
# lossless in practice (see the module docstring); int8 is faster still but costs perplexity.
AVX2_DEFAULT = "avx2-int16"


@dataclass(frozen=True)
class NativeKernel:
    """A LUT kernel as a numba caller uses it."""

    name: str
    module: ModuleType  # avx2 or avx512: decode_native, available, ROWS, MIN_PARALLEL_WORK
    table_bits: int  # AVX2's tables: 0 float32, 16 or 8 integer levels (AVX-512: 0, unused)
    scales_layout: str  # layout.ROWS_INNER or layout.LAYER_ORDER
    byte_map: np.ndarray | None  # how the kernel rewrites code bytes (AVX2 mirrors nibbles)

    @property
    def rows(self) -> int:
        return int(self.module.ROWS)

    def available(self) -> bool:
        return bool(self.module.available())

    def prepare_codes(
        self, packed: np.ndarray, in_features: int, out: np.ndarray | None = None
    ) -> layout.PreparedCodes:
        """Packed codes ``(q, out, ceil(in/8))`` uint8 in this kernel's layout (into ``out``)."""
        return layout.prepare_codes(packed, in_features, self.rows, self.byte_map, out)

    def prepare_scales(self, first_sets: np.ndarray, rest: np.ndarray) -> layout.PreparedScales:
        """α₁ sets ``(S, out, G)`` and the other planes ``(q-1, out, G)`` in this kernel's
        layout (AVX2: the arrays themselves where they can be read in place)."""
        if self.scales_layout == layout.LAYER_ORDER:
            return layout.scales_in_layer_order(first_sets, rest, self.rows)
        return layout.scales_rows_inner(first_sets, rest, self.rows)


KERNELS = {
    "avx512": NativeKernel("avx512", avx512, 0, layout.ROWS_INNER, None),
    "avx2": NativeKernel("avx2", avx2, 0, layout.LAYER_ORDER, avx2.MIRRORED),
    "avx2-int16": NativeKernel("avx2-int16", avx2, 16, layout.LAYER_ORDER, avx2.MIRRORED),
    "avx2-int8": NativeKernel("avx2-int8", avx2, 8, layout.LAYER_ORDER, avx2.MIRRORED),
}
CHOICES = ("auto", *KERNELS, "reference")


def kernel_setting() -> tuple[str, str]:
    """``ALPHATUNE_KERNEL`` as set, and as a choice (stripped, lower case, ``auto`` if unset)."""
    setting = os.environ.get(KERNEL_ENV, "")
    return setting, setting.strip().lower() or "auto"


def chosen_kernel() -> NativeKernel | None:
    """The LUT kernel for decode here: ``ALPHATUNE_KERNEL``, or the best this CPU runs."""
    setting, choice = kernel_setting()
    if choice == "auto":
        return KERNELS[AVX2_DEFAULT] if avx2.available() else None
    if choice == "reference":
        return None
    kernel = KERNELS.get(choice)
    if kernel is None:
        raise ConfigError(
            f"{KERNEL_ENV}={setting!r} is not a kernel; choose one of {', '.join(CHOICES)}"
        )
    if not kernel.available():
        raise KernelUnavailableError(
            f"{KERNEL_ENV}={setting!r}, but that kernel cannot run here (it needs numba and "
            f"{'AVX-512F' if kernel.module is avx512 else 'AVX2 and FMA'}); unset "
            f"{KERNEL_ENV} to pick the best kernel for this CPU"
        )
    return kernel


def required_kernel() -> NativeKernel:
    """``chosen_kernel()`` for a native decode path (the engine, the runtime), or
    ``UnsupportedModelError`` saying why none runs here (the engine's caller then falls back)."""
    if lut.IMPORT_ERROR is not None:
        raise UnsupportedModelError("native decode needs numba (pip install alphatune[fast])")
    kernel = chosen_kernel()
    if kernel is None:
        raise UnsupportedModelError(
            "no LUT kernel runs here (no AVX2 + FMA, or ALPHATUNE_KERNEL=reference)"
        )
    return kernel
