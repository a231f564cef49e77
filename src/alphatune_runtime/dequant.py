"""A dense weight from a layer's codes in a kernel's layout: float32, or bfloat16 bits.

The engine keeps one copy of the codes, laid out for its LUT kernel (``layout.prepare_codes``:
``(q, blocks, bytes, rows)`` uint8, bytes rewritten by the kernel's ``byte_map``). Long prompts
run faster through one GEMM per layer than through the LUT kernel (``alphatune.engine.prefill``),
which needs the weight dense for the time of that GEMM: this module rebuilds it from those codes,
so prefill reads no second copy of them (the layer's own codes are paged out once laid out).

``W[r, j] = Σ_i α_i[r, g(j)] · B_i[r, j] (+ offset[r, g(j)])``, the contract of
``alphatune.kernels.reference.dequantize_packed``. Each row block is summed over the planes in a
small float32 buffer per task (a ±1 vector per code byte from ``SIGNS``, times that plane's α),
then written once: as float32, or rounded to the nearest bfloat16 (ties to even), stored as its
uint16 bits, since numpy has no bfloat16 (the caller views them as one). On AVX-512BW CPUs both
run through ``dequant_avx512`` (table lookups, the same bits).
"""

from __future__ import annotations

import numpy as np

from alphatune_runtime.errors import ConfigError, KernelUnavailableError

try:
    from numba import njit, prange

    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    IMPORT_ERROR = exc

# Row s: the 8 codes (±1) byte value s encodes, least significant bit first.
SIGNS = (((np.arange(256)[:, None] >> np.arange(8)) & 1) * 2 - 1).astype(np.float32)


def inverse_byte_map(byte_map: np.ndarray | None) -> np.ndarray:
    """The map back from a kernel's stored code bytes to the packing's (identity for None)."""
    if byte_map is None:
        return np.arange(256, dtype=np.uint8)
    if sorted(byte_map.tolist()) != list(range(256)):
        raise ConfigError("a kernel's byte map must be a permutation of the 256 byte values")
    inverse = np.empty(256, np.uint8)
    inverse[byte_map] = np.arange(256, dtype=np.uint8)
    return inverse


if IMPORT_ERROR is None:

    @njit(inline="always")
    def bfloat16_bits(value):  # pragma: no cover - numba
        """The uint16 bits of float32 ``value`` rounded to the nearest bfloat16, ties to even:
        add 0x7FFF plus the kept part's low bit, keep the high half. A NaN stays a (quiet) NaN
        rather than rounding into an infinity or wrapping to zero."""
        u = np.float32(value).view(np.uint32)
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return np.uint16((u >> 16) | np.uint32(0x40))
        return np.uint16((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16)

    @njit(cache=True)
    def _sum_block(
        codes, inverse, first, rest, offset, with_offset, bytes_per_group, block, acc
    ):  # pragma: no cover - numba
        """Rows of row block ``block`` into acc (rows, 8·bytes); returns how many are real."""
        bits, _, n_bytes, rows = codes.shape
        out_features, n_groups = first.shape
        count = min(rows, out_features - block * rows)
        for r in range(count):
            row = block * rows + r
            sums = acc[r]
            for g in range(n_groups):
                begin, end = g * bytes_per_group, min(n_bytes, (g + 1) * bytes_per_group)
                sums[8 * begin : 8 * end] = offset[row, g] if with_offset else np.float32(0.0)
                for i in range(bits):
                    a = first[row, g] if i == 0 else rest[i - 1, row, g]
                    for k in range(begin, end):
                        signs = SIGNS[inverse[codes[i, block, k, r]]]
                        at = 8 * k
                        for b in range(8):
                            sums[at + b] += a * signs[b]
        return count

    @njit(parallel=True, cache=True)
    def _dequantize_blocks(
        codes, inverse, first, rest, offset, with_offset, bytes_per_group, out, as_bfloat16
    ):  # pragma: no cover - numba
        """Every row block into out: float32, or (``as_bfloat16``, out uint16) bfloat16 bits."""
        _, blocks, n_bytes, rows = codes.shape
        width = out.shape[1]
        for block in prange(blocks):
            acc = np.empty((rows, 8 * n_bytes), np.float32)
            count = _sum_block(
                codes, inverse, first, rest, offset, with_offset, bytes_per_group, block, acc
            )
            for r in range(count):
                row = out[block * rows + r]
                if not as_bfloat16:
                    row[:] = acc[r, :width]
                    continue
                for j in range(width):
                    row[j] = bfloat16_bits(acc[r, j])


def dequantize(
    codes: np.ndarray,
    inverse: np.ndarray,
    first: np.ndarray,
    rest: np.ndarray,
    offset: np.ndarray | None,
    group_size: int,
    out: np.ndarray,
    vector_path: bool = True,
) -> np.ndarray:
    """Write the dense weight of one layer into ``out`` and return it.

    Args:
        codes: ``(q, blocks, ceil(in/8), rows)`` uint8, the layer's codes in a kernel's layout.
        inverse: ``inverse_byte_map(kernel.byte_map)``.
        first: ``(out, G)`` float32, α₁ (one scale set).
        rest: ``(q-1, out, G)`` float32, the other planes' scales.
        offset: ``(out, G)`` float32, or None.
        group_size: inputs per group (a multiple of 8, or ``in``: one group).
        out: ``(out, in)`` C-contiguous, float32, or uint16 for bfloat16 bits.
        vector_path: through ``dequant_avx512``'s table lookups where the CPU has AVX-512BW
            (bfloat16 up to 5 bits, float32 up to 4: the same bits as the generic loop; False:
            the generic loop, for tests and measurements).
    """
    if IMPORT_ERROR is not None:
        raise KernelUnavailableError("dequantization needs numba (pip install numba)")
    bits, blocks, n_bytes, rows = codes.shape
    out_features, in_features = out.shape
    n_groups = first.shape[1]
    groups = (out_features, in_features // group_size)
    if first.shape != groups or rest.shape != (bits - 1, *groups):
        raise ConfigError(
            f"scales {first.shape} / {rest.shape} do not fit a {bits}-bit ({out_features}, "
            f"{in_features}) weight in groups of {group_size}"
        )
    if blocks * rows < out_features or n_bytes != (in_features + 7) // 8:
        raise ConfigError(
            f"codes {codes.shape} do not hold a ({out_features}, {in_features}) weight: "
            f"expected >= {out_features} rows in blocks and {(in_features + 7) // 8} bytes a row"
        )
    if offset is not None and offset.shape != groups:
        raise ConfigError(f"offset {offset.shape} does not fit scales {groups}")
    if not out.flags.c_contiguous:
        raise ConfigError("out must be C-contiguous")
    if n_groups > 1 and group_size % 8:
        raise ConfigError(f"groups of {group_size} split a code byte; the layout needs whole bytes")
    bytes_per_group = n_bytes if n_groups == 1 else group_size // 8
    with_offset = offset is not None
    shift = offset if with_offset else np.zeros((1, 1), np.float32)
    if out.dtype not in (np.float32, np.uint16):
        raise ConfigError(f"out must be float32 or uint16 (bfloat16 bits), got {out.dtype}")
    from alphatune_runtime import dequant_avx512  # it imports this module's bfloat16_bits

    most = dequant_avx512.MAX_BITS if out.dtype == np.uint16 else dequant_avx512.MAX_BITS_FLOAT32
    if vector_path and bits <= most and dequant_avx512.available():
        dequant_avx512.dequantize_lookup(
            codes, inverse, first, rest, shift, with_offset, bytes_per_group, out
        )
        return out
    _dequantize_blocks(
        codes, inverse, first, rest, shift, with_offset, bytes_per_group, out,
        out.dtype == np.uint16,
    )  # fmt: skip
    return out
