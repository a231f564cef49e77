"""Products with a uniform 8-bit table on CPU (numba): one byte per weight, one multiply-add.

A compact embedding/head table (``alphatune.embedding``) is fitted by round to nearest on a
uniform grid and written as BCQ with offset: plane ``p`` of ``q`` holds bit ``q-1-p`` of each
weight's level with scale ``α_p = a·2^(q-1-p)`` (``a``: the last plane's scale). So every weight
is affine in its level byte, ``w = step·level + low`` per (row, group), with ``step = 2a`` and
``low = offset - a·(2^q - 1)``. A product then reads one byte per weight and does one
multiply-add, where the LUT kernel does one table lookup per weight *and plane* (8 for an 8-bit
table): measured on SmolLM2's 49,152 × 576 head, one token, one thread (AVX2), 4.5 ms against
10–11 ms (docs/performance.md). The bytes take exactly the memory of the packed planes.

``uniform_form`` says whether a table has that form (any other BCQ table keeps the general
kernels); ``levels_from_planes`` / ``planes_from_levels`` convert between packed planes (the
stored layout) and level bytes; ``table_matmul`` is the product, parallel over blocks of rows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alphatune.kernels.numba_threads import numba_threads, threads_for
from alphatune.packing import pack_bits, packed_width, unpack_bits

try:
    from numba import njit, prange

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    _IMPORT_ERROR = exc

_ROW_BLOCK = 256  # rows per parallel task: 147 KB of bytes at 576 wide, many tasks per thread
_MIN_PARALLEL_WORK = 1 << 20  # bytes x tokens below which one thread beats a thread launch
_CONVERT_ROWS = 4096  # rows converted from planes to bytes at a time


def available() -> bool:
    """True when numba imported."""
    return _IMPORT_ERROR is None


def uniform_form(alpha: Tensor, offset: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(step, low)`` ``(rows, G)`` float32 if the plane scales are geometric, else ``None``.

    Args:
        alpha: ``(q, rows, G)`` plane scales, largest first (``fit_table``'s layout).
        offset: ``(rows, G)``.

    The test is exact (``α_p == a·2^(q-1-p)`` for every plane), so a table that satisfies it
    computes the same weights as its planes up to the float rounding of ``low``.
    """
    q = alpha.shape[0]
    last = alpha[q - 1].float()
    powers = 2.0 ** torch.arange(q - 1, -1, -1, dtype=torch.float32, device=alpha.device)
    if not torch.equal(alpha.float(), last[None] * powers[:, None, None]):
        return None
    return 2 * last, offset.float() - last * (2**q - 1)


def levels_from_planes(packed: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """Packed planes ``(q, rows, ceil(dim/8))`` (plane 0 the most significant bit) -> level
    bytes ``(rows, dim)`` uint8; ``q <= 8``. ``out``: a contiguous ``(rows, dim)`` uint8 tensor
    to write them into (returned), e.g. a slice of a larger table's levels."""
    q, rows, _ = packed.shape
    if q > 8:
        raise ValueError(f"level bytes hold at most 8 planes, got {q}")
    levels = torch.empty(rows, dim, dtype=torch.uint8, device=packed.device) if out is None else out
    if available() and packed.is_cpu:
        _unpack_levels(np.ascontiguousarray(packed.numpy()), levels.numpy())
        return levels
    for start in range(0, rows, _CONVERT_ROWS):  # torch: a chunk of rows at a time
        end = min(start + _CONVERT_ROWS, rows)
        part = levels[start:end]
        part.zero_()
        for plane in range(q):
            part |= unpack_bits(packed[plane, start:end], dim) << (q - 1 - plane)
    return levels


def plane_bytes(levels: Tensor, bits: int, plane: int) -> Tensor:
    """Packed plane ``plane`` (of ``bits``) of the levels ``(rows, dim)``: ``(rows,
    ceil(dim/8))`` uint8, what ``planes_from_levels(levels, bits)[plane]`` holds."""
    shift = bits - 1 - plane
    if available() and levels.is_cpu:
        out = np.empty((levels.shape[0], packed_width(levels.shape[1])), dtype=np.uint8)
        levels_np = np.ascontiguousarray(levels.numpy())
        if levels_np.shape[1] % 8 == 0:  # 8 levels per 64-bit word: one multiply packs them
            _pack_plane_words(levels_np.view(np.uint64), shift, out)
        else:
            _pack_plane(levels_np, shift, out)
        return torch.from_numpy(out)
    return pack_bits((levels >> shift) & 1)


def planes_from_levels(levels: Tensor, bits: int) -> Tensor:
    """``levels_from_planes``'s inverse: ``(rows, dim)`` uint8 -> ``(bits, rows, ceil(dim/8))``."""
    rows, dim = levels.shape
    planes = torch.empty(bits, rows, packed_width(dim), dtype=torch.uint8, device=levels.device)
    for plane in range(bits):
        planes[plane] = plane_bytes(levels, bits, plane)
    return planes


if _IMPORT_ERROR is None:

    @njit(parallel=True, cache=True)
    def _unpack_levels(packed, levels):  # pragma: no cover
        """``levels[r, 8b + k]`` = Σ_p bit k of ``packed[p, r, b]`` << (q - 1 - p)."""
        q, rows, width = packed.shape
        dim = levels.shape[1]
        for r in prange(rows):
            for b in range(width):
                for k in range(min(8, dim - 8 * b)):
                    level = 0
                    for p in range(q):
                        level |= ((packed[p, r, b] >> k) & 1) << (q - 1 - p)
                    levels[r, 8 * b + k] = level

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


if _IMPORT_ERROR is None:

    @njit(parallel=True, fastmath=True, cache=True)
    def _matmul(x, levels, step, low, group_size, out):  # pragma: no cover
        """``out[t, r] = Σ_g step[r, g]·(levels[r, g] · x[t, g]) + low[r, g]·Σ x[t, g]``."""
        tokens, dim = x.shape
        rows = levels.shape[0]
        groups = dim // group_size
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


def table_matmul(x: Tensor, levels: Tensor, step: Tensor, low: Tensor, group_size: int) -> Tensor:
    """``x`` ``(T, dim)`` float32 times the table's transpose: ``(T, rows)`` float32.

    Args:
        levels: ``(rows, dim)`` uint8 level bytes (``levels_from_planes``).
        step, low: ``(rows, dim // group_size)`` float32 (``uniform_form``).
    """
    if _IMPORT_ERROR is not None:
        raise ImportError("the byte table kernel needs numba") from _IMPORT_ERROR
    x_np = np.ascontiguousarray(x.detach().float().numpy())
    rows, dim = levels.shape
    out = np.empty((x_np.shape[0], rows), dtype=np.float32)
    with numba_threads(threads_for(rows * dim * x_np.shape[0], _MIN_PARALLEL_WORK)):
        _matmul(x_np, levels.numpy(), step.numpy(), low.numpy(), group_size, out)
    return torch.from_numpy(out)
