"""BCQ's alternating refinement on CPU (numba), parallel over scale groups.

Same algorithm as the torch form in ``alphatune.bcq._alternate``: per group of ``g`` weights,
re-fit the scales (and offset) of the current codes by (weighted) least squares, then re-pick each
weight's codes as the nearest of the 2^q grid values, and keep the best iterate. The torch form
runs each step over all groups at once through (N, g, q)-sized temporaries and a batched solve;
here each group's step stays in registers and a (q+1)² system is solved in place, so a round costs
a few passes over the weights instead of dozens. Sums are taken in float64 (the torch form uses
the weights' float32), so results agree to rounding, not bit for bit.
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

_MIN_PARALLEL_WORK = 1 << 16  # weights below which one thread beats a thread launch


def available() -> bool:
    """True when numba imported."""
    return _IMPORT_ERROR is None


if _IMPORT_ERROR is None:

    @njit(cache=True)
    def _least_squares(x, w, codes, with_offset, gram, rhs, solution):  # pragma: no cover
        """Scales (and offset, last) minimising Σ w·(x - Σ a_i·c_i - o)² into ``solution``.

        A relative ridge of 1e-6 keeps identical or opposite planes solvable, as in the torch
        form; the system is solved by Gaussian elimination with partial pivoting.
        """
        q, g = codes.shape
        p = q + 1 if with_offset else q
        for a in range(p):
            rhs[a] = 0.0
            for b in range(p):
                gram[a, b] = 0.0
        for j in range(g):
            for a in range(p):
                da = codes[a, j] if a < q else 1.0
                wa = w[j] * da
                rhs[a] += wa * x[j]
                for b in range(a, p):
                    db = codes[b, j] if b < q else 1.0
                    gram[a, b] += wa * db
        for a in range(p):
            for b in range(a):
                gram[a, b] = gram[b, a]
        diagonal = 0.0
        for a in range(p):
            diagonal += gram[a, a]
        ridge = 1e-6 * max(diagonal / p, 1e-12)
        for a in range(p):
            gram[a, a] += ridge
        for col in range(p):
            pivot = col
            for r in range(col + 1, p):
                if abs(gram[r, col]) > abs(gram[pivot, col]):
                    pivot = r
            if pivot != col:
                for c in range(p):
                    gram[col, c], gram[pivot, c] = gram[pivot, c], gram[col, c]
                rhs[col], rhs[pivot] = rhs[pivot], rhs[col]
            for r in range(col + 1, p):
                factor = gram[r, col] / gram[col, col]
                for c in range(col, p):
                    gram[r, c] -= factor * gram[col, c]
                rhs[r] -= factor * rhs[col]
        for r in range(p - 1, -1, -1):
            total = rhs[r]
            for c in range(r + 1, p):
                total -= gram[r, c] * solution[c]
            solution[r] = total / gram[r, r]

    @njit(cache=True)
    def _error(x, w, codes, solution, with_offset):  # pragma: no cover
        q, g = codes.shape
        offset = solution[q] if with_offset else 0.0
        total = 0.0
        for j in range(g):
            approx = offset
            for i in range(q):
                approx += solution[i] * codes[i, j]
            diff = x[j] - approx
            total += w[j] * diff * diff
        return total

    @njit(cache=True)
    def _nearest(x, solution, with_offset, table, codes):  # pragma: no cover
        """Each weight's codes: the nearest of the 2^q values Σ ±a_i (+ o)."""
        m, q = table.shape
        offset = solution[q] if with_offset else 0.0
        values = np.empty(m)
        order = np.empty(m, dtype=np.int64)
        for c in range(m):  # insertion sort: m <= 256
            value = offset
            for i in range(q):
                value += solution[i] * table[c, i]
            k = c
            while k > 0 and values[k - 1] > value:
                values[k] = values[k - 1]
                order[k] = order[k - 1]
                k -= 1
            values[k] = value
            order[k] = c
        for j in range(x.shape[0]):
            k = 0  # the first midpoint >= x (torch.searchsorted, left)
            while k < m - 1 and (values[k] + values[k + 1]) / 2 < x[j]:
                k += 1
            for i in range(q):
                codes[i, j] = table[order[k], i]

    @njit(parallel=True, cache=True)
    def _alternate_groups(
        rows, weights, codes, alpha, offset, with_offset, iterations, table
    ):  # pragma: no cover
        """In place: codes (q, N, g), alpha (q, N), offset (N,) become each group's best iterate."""
        q, n, g = codes.shape
        p = q + 1 if with_offset else q
        for r in prange(n):
            x = rows[r].astype(np.float64)
            w = weights[r].astype(np.float64)
            current = codes[:, r, :].astype(np.float64)  # (q, g)
            best = np.empty(p)
            for i in range(q):
                best[i] = alpha[i, r]
            if with_offset:
                best[q] = offset[r]
            best_error = _error(x, w, current, best, with_offset)
            best_codes = current.copy()
            solution = np.empty(p)
            gram = np.empty((p, p))
            rhs = np.empty(p)
            for round_ in range(iterations + 1 if iterations else 0):
                if round_:
                    _nearest(x, solution, with_offset, table, current)
                _least_squares(x, w, current, with_offset, gram, rhs, solution)
                error = _error(x, w, current, solution, with_offset)
                if error < best_error:
                    best_error = error
                    best[:] = solution
                    best_codes[:, :] = current
            for i in range(q):
                alpha[i, r] = best[i]
                for j in range(g):
                    codes[i, r, j] = best_codes[i, j]
            if with_offset:
                offset[r] = best[q]


def alternate(
    rows: Tensor,
    codes: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    iterations: int,
    weights: Tensor | None,
    table: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The best of ``iterations`` alternating rounds per group (see ``bcq._alternate``).

    rows (N, g), codes (q, N, g) ±1, alpha (q, N), offset (N,) or None, weights (N, g) or None,
    table (2^q, q) the sign patterns -> codes, alpha, offset in the inputs' dtypes.
    """
    dtype = rows.dtype
    out_codes = np.ascontiguousarray(codes.detach().float().numpy()).copy()
    out_alpha = np.ascontiguousarray(alpha.detach().float().numpy()).copy()
    with_offset = offset is not None
    out_offset = (
        np.ascontiguousarray(offset.detach().float().numpy()).copy()
        if offset is not None
        else np.zeros(rows.shape[0], dtype=np.float32)
    )
    row_weights = (
        np.ones(rows.shape, dtype=np.float32)
        if weights is None
        else np.ascontiguousarray(weights.detach().float().numpy())
    )
    with numba_threads(threads_for(rows.numel(), _MIN_PARALLEL_WORK)):
        _alternate_groups(
            np.ascontiguousarray(rows.detach().float().numpy()),
            row_weights,
            out_codes,
            out_alpha,
            out_offset,
            with_offset,
            iterations,
            np.ascontiguousarray(table.detach().double().numpy()),
        )
    return (
        torch.from_numpy(out_codes).to(dtype),
        torch.from_numpy(out_alpha).to(dtype),
        torch.from_numpy(out_offset).to(dtype) if with_offset else None,
    )
