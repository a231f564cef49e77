"""GPTQ's column-by-column rounding with error feedback on CPU (numba), parallel over rows.

Same result as the torch loop in ``alphatune.gptq.round_with_error_feedback`` up to float
rounding order: each row's columns are rounded in order to the nearest value of their group's
grid, and each rounding error is spread over the row's later columns through the upper Cholesky
factor of the inverse Hessian. As in GPTQ, columns go in blocks: within a block the errors are
fed forward column by column here (rows never exchange errors, so tiles of rows run in
parallel, each factor row reused from L1 by every row of a tile); the block's errors then reach
the later columns in one GEMM. The column loop is where the torch form spends its time (~10
small tensor calls per column, 5,000 columns per SmolLM2 block): interpreter time, not
arithmetic; the GEMM takes most of the arithmetic out of the scalar loop (a 1536-column layer:
~1/12 of the multiply-adds stay in it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alphatune.kernels.numba_threads import numba_threads, threads_for

try:
    from numba import njit, prange

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    _IMPORT_ERROR = exc

_TILE = 8  # rows swept together: each factor row is loaded once per tile
_MIN_PARALLEL_WORK = 1 << 20  # rows x columns² below which one thread beats a thread launch


def available() -> bool:
    """True when numba imported."""
    return _IMPORT_ERROR is None


if _IMPORT_ERROR is None:

    @njit(cache=True)
    def _round_tile(
        w, factor, group_of, values, midpoints, first, last, index, errors
    ):  # pragma: no cover
        """Rows first..last-1 of a block: ``index[r, c]`` = chosen grid entry of column c (in
        sweep order), ``errors[r, c]`` = its rounding error over the pivot (fed to later
        columns: inside the block here, beyond it by the caller's GEMM)."""
        rows = last - first
        n = w.shape[1]
        work = w[first:last].copy()  # (rows, n): the tile's columns as errors are fed forward
        for c in range(n):
            g = group_of[c]
            pivot = factor[c, c]
            for t in range(rows):
                r = first + t
                x = work[t, c]
                grid = midpoints[r, g]
                # torch.searchsorted (left): the first midpoint >= x.
                k = 0
                while k < grid.shape[0] and grid[k] < x:
                    k += 1
                index[r, c] = k
                errors[r, c] = (x - values[r, g, k]) / pivot
            factor_row = factor[c]
            for t in range(rows):
                e = errors[first + t, c]
                row = work[t]
                for j in range(c + 1, n):
                    row[j] -= e * factor_row[j]

    @njit(parallel=True, cache=True)
    def _round_rows(
        w, factor, group_of, values, midpoints, tile, index, errors
    ):  # pragma: no cover
        out = w.shape[0]
        tiles = (out + tile - 1) // tile
        for i in prange(tiles):
            first = i * tile
            _round_tile(
                w, factor, group_of, values, midpoints, first, min(out, first + tile), index,
                errors,
            )  # fmt: skip


def round_columns(
    weight: Tensor,
    factor: Tensor,
    group_of: Tensor,
    values: Tensor,
    midpoints: Tensor,
    block_size: int = 128,
) -> Tensor:
    """Grid entry chosen for every weight, columns in sweep order.

    GPTQ's lazy block updates: inside a block of ``block_size`` columns the errors are fed
    forward column by column (numba, rows in parallel); the block's errors reach the later
    columns in one GEMM (torch), where most of the arithmetic is.

    Args:
        weight: ``(out, n)`` float32, columns already in sweep order.
        factor: ``(n, n)`` upper Cholesky factor of the inverse Hessian, in sweep order.
        group_of: ``(n,)`` the scale group of each swept column.
        values: ``(out, G, 2^q)`` each row's and group's sorted grid values.
        midpoints: ``(out, G, 2^q - 1)`` midpoints between neighbouring grid values.
    Returns:
        ``(out, n)`` int64 indices into ``values[r, group_of[c]]``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    w = weight.detach().float().clone()
    factor = factor.float()
    out, n = w.shape
    index = np.empty((out, n), dtype=np.int64)
    groups = np.ascontiguousarray(group_of.numpy().astype(np.int64))
    values_np = np.ascontiguousarray(values.float().numpy())
    midpoints_np = np.ascontiguousarray(midpoints.float().numpy())
    for begin in range(0, n, block_size):
        end = min(begin + block_size, n)
        block = np.ascontiguousarray(w[:, begin:end].numpy())
        block_index = np.empty((out, end - begin), dtype=np.int64)
        errors = np.empty((out, end - begin), dtype=np.float32)
        with numba_threads(threads_for(out * (end - begin) ** 2, _MIN_PARALLEL_WORK)):
            _round_rows(
                block,
                np.ascontiguousarray(factor[begin:end, begin:end].numpy()),
                groups[begin:end],
                values_np,
                midpoints_np,
                _TILE,
                block_index,
                errors,
            )
        index[:, begin:end] = block_index
        if end < n:
            w[:, end:].sub_(torch.from_numpy(errors) @ factor[begin:end, end:])
    return torch.from_numpy(index)
