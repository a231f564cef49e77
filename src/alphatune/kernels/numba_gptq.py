"""GPTQ's column-by-column rounding with error feedback on CPU (numba), parallel over rows.

Same result as the torch loop in ``alphatune.gptq.round_with_error_feedback`` up to float
rounding order: each row's columns are rounded in order to the nearest value of their group's
grid, and each rounding error is spread over the row's later columns through the upper Cholesky
factor of the inverse Hessian. Rows never exchange errors, so tiles of rows run in parallel; a
tile sweeps the factor once, each factor row reused from L1 by every row of the tile. The torch
loop makes ~10 small tensor calls per column (5,000 columns per SmolLM2 block): interpreter time,
not arithmetic.
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
    def _round_tile(w, factor, group_of, values, midpoints, first, last, index):  # pragma: no cover
        """Rows first..last-1: ``index[r, c]`` = chosen grid entry of column c (in sweep order)."""
        rows = last - first
        n = w.shape[1]
        work = w[first:last].copy()  # (rows, n): the tile's columns as errors are fed forward
        errors = np.empty(rows, dtype=np.float32)
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
                errors[t] = (x - values[r, g, k]) / pivot
            factor_row = factor[c]
            for t in range(rows):
                e = errors[t]
                row = work[t]
                for j in range(c + 1, n):
                    row[j] -= e * factor_row[j]

    @njit(parallel=True, cache=True)
    def _round_rows(w, factor, group_of, values, midpoints, tile, index):  # pragma: no cover
        out = w.shape[0]
        tiles = (out + tile - 1) // tile
        for i in prange(tiles):
            first = i * tile
            _round_tile(
                w, factor, group_of, values, midpoints, first, min(out, first + tile), index
            )


def round_columns(
    weight: Tensor, factor: Tensor, group_of: Tensor, values: Tensor, midpoints: Tensor
) -> Tensor:
    """Grid entry chosen for every weight, columns in sweep order.

    Args:
        weight: ``(out, n)`` float32, columns already in sweep order.
        factor: ``(n, n)`` upper Cholesky factor of the inverse Hessian, in sweep order.
        group_of: ``(n,)`` the scale group of each swept column.
        values: ``(out, G, 2^q)`` each row's and group's sorted grid values.
        midpoints: ``(out, G, 2^q - 1)`` midpoints between neighbouring grid values.
    Returns:
        ``(out, n)`` int64 indices into ``values[r, group_of[c]]``.
    """
    w = np.ascontiguousarray(weight.detach().float().numpy())
    out, n = w.shape
    index = np.empty((out, n), dtype=np.int64)
    with numba_threads(threads_for(out * n * n, _MIN_PARALLEL_WORK)):
        _round_rows(
            w,
            np.ascontiguousarray(factor.float().numpy()),
            np.ascontiguousarray(group_of.numpy().astype(np.int64)),
            np.ascontiguousarray(values.float().numpy()),
            np.ascontiguousarray(midpoints.float().numpy()),
            _TILE,
            index,
        )
    return torch.from_numpy(index)
