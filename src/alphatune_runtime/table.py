"""Products with a uniform 8-bit table on CPU (numba, numpy arrays): one byte per weight.

A compact embedding/head table (``alphatune.embedding``) is fitted by round to nearest on a
uniform grid and written as BCQ with offset: plane ``p`` of ``q`` holds bit ``q-1-p`` of each
weight's level with scale ``α_p = a·2^(q-1-p)`` (``a``: the last plane's scale). So every weight
is affine in its level byte, ``w = step·level + low`` per (row, group), with ``step = 2a`` and
``low = offset - a·(2^q - 1)``. A product then reads one byte per weight and does one
multiply-add, where the LUT kernel does one table lookup per weight *and plane* (8 for an 8-bit
table): measured on SmolLM2's 49,152 × 576 head, one token, one thread (AVX2), 4.5 ms against
10–11 ms (docs/performance.md). The bytes take exactly the memory of the packed planes.

``uniform_form`` says whether a table has that form (any other BCQ table keeps the general
kernels); ``levels_from_planes`` converts packed planes (the stored layout) to level bytes;
``table_matmul`` is the product, parallel over blocks of rows; ``table_rows`` reads rows.
``alphatune.kernels.numba_table`` is the torch face (and converts back to planes).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from alphatune_runtime.errors import ConfigError

try:
    from numba import njit, prange

    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    IMPORT_ERROR = exc

_ROW_BLOCK = 256  # rows per parallel task: 147 KB of bytes at 576 wide, many tasks per thread
MIN_PARALLEL_WORK = 1 << 20  # bytes x tokens below which one thread beats a thread launch
# The product asks for the bytes of the row this many rows ahead while it computes on the
# current one (``prefetch``). A decode step's head reads its table from memory, the blocks having
# pushed it out of the caches: one token, one thread, caches flushed before each call, median of
# 9 (quiet Xeon, random tables): SmolLM2's 49,152 x 576 table 5.97 ms without, 2.89 / 2.68 /
# 3.47 / 3.42 ms at 2 / 4 / 8 / 16 rows ahead; Gemma-3's 262,144 x 640 29.0 ms without, 14.8 /
# 14.8 / 20.4 / 16.3 ms. The same products, bit for bit.
PREFETCH_ROWS = 4


def available() -> bool:
    """True when numba imported."""
    return IMPORT_ERROR is None


def uniform_form(alpha: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(step, low)`` ``(rows, G)`` float32 if the plane scales are geometric, else ``None``.

    Args:
        alpha: ``(q, rows, G)`` plane scales, largest first (``fit_table``'s layout).
        offset: ``(rows, G)``.

    The test is exact (``α_p == a·2^(q-1-p)`` for every plane), so a table that satisfies it
    computes the same weights as its planes up to the float rounding of ``low``.
    """
    alpha = alpha.astype(np.float32, copy=False)
    q = alpha.shape[0]
    last = alpha[q - 1]
    powers = np.float32(2.0) ** np.arange(q - 1, -1, -1, dtype=np.float32)
    if not np.array_equal(alpha, last[None] * powers[:, None, None]):
        return None
    return 2 * last, offset.astype(np.float32, copy=False) - last * np.float32(2**q - 1)


def levels_from_planes(packed: np.ndarray, dim: int, out: np.ndarray | None = None) -> np.ndarray:
    """Packed planes ``(q, rows, ceil(dim/8))`` uint8 (plane 0 the most significant bit) ->
    level bytes ``(rows, dim)`` uint8 (into ``out`` when given); ``q <= 8``."""
    q, rows, _ = packed.shape
    return levels_from_plane_slices(packed, q, rows, dim, out)


def levels_from_plane_slices(
    planes: Iterable[np.ndarray], count: int, rows: int, dim: int, out: np.ndarray | None = None
) -> np.ndarray:
    """``levels_from_planes`` from the ``count`` planes ``(rows, ceil(dim/8))`` one at a time
    (plane 0 the most significant bit): only one plane need be in memory beside the bytes.

    One pass per plane is also the faster order: 72 against 113 ms for SmolLM2's 49,152 x 576
    table, 306 against 703 ms for Gemma-3's 262,144 x 640 (quiet Xeon, 2 threads), against one
    pass that gathered every plane's bit of each byte.
    """
    if count > 8:
        raise ValueError(f"level bytes hold at most 8 planes, got {count}")
    levels = np.zeros((rows, dim), np.uint8) if out is None else out
    levels[...] = 0
    taken = 0
    for plane in planes:
        _add_plane(np.ascontiguousarray(plane), count - 1 - taken, levels)
        taken += 1
    if taken != count:
        raise ValueError(f"expected {count} planes, got {taken}")
    return levels


def table_rows(
    levels: np.ndarray, step: np.ndarray, low: np.ndarray, ids: np.ndarray, group_size: int
) -> np.ndarray:
    """Rows ``ids`` ``(N,)`` of the table, ``(N, dim)`` float32: ``step·level + low`` per group."""
    picked = levels[ids].astype(np.float32)  # IndexError for an id out of range
    n, dim = picked.shape
    grouped = picked.reshape(n, -1, group_size)
    rows = grouped * step[ids][..., None] + low[ids][..., None]
    return np.ascontiguousarray(rows.reshape(n, dim), np.float32)


def table_matmul(
    x: np.ndarray,
    levels: np.ndarray,
    step: np.ndarray,
    low: np.ndarray,
    group_size: int,
) -> np.ndarray:
    """``x`` ``(T, dim)`` float32 times the table's transpose: ``(T, rows)`` float32, on numba's
    current thread count (the caller sets it).

    Args:
        levels: ``(rows, dim)`` uint8 level bytes (``levels_from_planes``).
        step, low: ``(rows, dim // group_size)`` float32 (``uniform_form``).
    """
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2 or levels.ndim != 2 or x.shape[1] != levels.shape[1]:
        raise ConfigError(
            f"inputs {x.shape} do not fit a table of {levels.shape} (rows, width) level bytes"
        )
    out = np.empty((x.shape[0], levels.shape[0]), dtype=np.float32)
    # C order: the kernel prefetches through the bytes' flat view (no copy for a table's own).
    _matmul(x, np.ascontiguousarray(levels), step, low, group_size, out)
    return out


if IMPORT_ERROR is None:

    @njit(parallel=True, cache=True)
    def _add_plane(plane, shift, levels):  # pragma: no cover
        """``levels[r, 8b + k] |=`` bit k of ``plane[r, b]`` << ``shift``."""
        rows, width = plane.shape
        dim = levels.shape[1]
        for r in prange(rows):
            for b in range(width):
                byte = plane[r, b]
                for k in range(min(8, dim - 8 * b)):
                    levels[r, 8 * b + k] |= ((byte >> k) & 1) << shift

    @njit(parallel=True, cache=True)
    def _pack_plane_words(words, shift, out):  # pragma: no cover
        """``_pack_plane`` on 8 levels per (little-endian) word: bit ``shift`` of each byte,
        moved to bit 0 of its byte, and the 8 bits gathered into the top byte by one multiply
        (byte k lands on bit 56 + k)."""
        rows, width = words.shape
        ones = np.uint64(0x0101010101010101)
        gather = np.uint64(0x0102040810204080)
        down, top = np.uint64(shift), np.uint64(56)
        for r in prange(rows):
            for b in range(width):
                out[r, b] = np.uint8((((words[r, b] >> down) & ones) * gather) >> top)

    @njit(parallel=True, cache=True)
    def _pack_plane(levels, shift, out):  # pragma: no cover
        """``out[r, b]`` = Σ_k bit ``shift`` of ``levels[r, 8b + k]`` << k (LSB first)."""
        rows, dim = levels.shape
        for r in prange(rows):
            for b in range(out.shape[1]):
                byte = 0
                for k in range(min(8, dim - 8 * b)):
                    byte |= ((levels[r, 8 * b + k] >> shift) & 1) << k
                out[r, b] = byte


if IMPORT_ERROR is None:
    from alphatune_runtime.prefetch import LINE_BYTES, prefetch

    @njit(parallel=True, fastmath=True, cache=True)
    def _matmul(x, levels, step, low, group_size, out):  # pragma: no cover
        """``out[t, r] = Σ_g step[r, g]·(levels[r, g] · x[t, g]) + low[r, g]·Σ x[t, g]``;
        ``levels`` C-contiguous."""
        tokens, dim = x.shape
        rows = levels.shape[0]
        groups = dim // group_size
        flat = levels.reshape(-1)
        ahead = PREFETCH_ROWS * dim
        sums = np.empty((tokens, groups), dtype=np.float32)
        for t in range(tokens):
            for g in range(groups):
                acc = np.float32(0.0)
                for j in range(g * group_size, (g + 1) * group_size):
                    acc += x[t, j]
                sums[t, g] = acc
        blocks = (rows + _ROW_BLOCK - 1) // _ROW_BLOCK
        for b in prange(blocks):
            for r in range(b * _ROW_BLOCK, min(rows, (b + 1) * _ROW_BLOCK)):
                at = r * dim + ahead
                if at + dim <= flat.shape[0]:
                    for line in range(0, dim, LINE_BYTES):
                        prefetch(flat, at + line)
                row = levels[r]
                for t in range(tokens):
                    xt = x[t]
                    total = np.float32(0.0)
                    for g in range(groups):
                        start = g * group_size
                        # Slices, not 2-d indexing: LLVM vectorises this loop only so.
                        codes = row[start : start + group_size]
                        xs = xt[start : start + group_size]
                        acc = np.float32(0.0)
                        for j in range(group_size):
                            acc += np.float32(codes[j]) * xs[j]
                        total += step[r, g] * acc + low[r, g] * sums[t, g]
                    out[t, r] = total
