"""BCQ's alternating refinement on CPU (numba), parallel over scale groups.

Same algorithm as the torch form in ``alphatune.bcq._alternate``: per group of ``g`` weights,
re-fit the scales (and offset) of the current codes by (weighted) least squares, then re-pick each
weight's codes as the nearest of the 2^q grid values, and keep the best iterate. The torch form
runs each step over all groups at once through (N, g, q)-sized temporaries and a batched solve.
Here a group holds one sign-pattern index per weight, and the normal equations and the error are
built from per-pattern sums (Σ w, Σ w·x; 2^q of them), so a round is one pass over the weights
(the nearest value by bisection) plus O(2^q·q²) work, and the (q+1)² system is solved in place.
Sums are taken in float64 (the torch form uses the weights' float32), so results agree to
rounding, not bit for bit.
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
    def _solve(gram, rhs, solution, p):  # pragma: no cover
        """``gram`` x = ``rhs`` (p x p, overwritten) by Gaussian elimination with partial
        pivoting, after a relative ridge of 1e-6 that keeps identical or opposite planes
        solvable (as in the torch form)."""
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
    def _least_squares(design, counts, sums, gram, rhs, solution):  # pragma: no cover
        """Scales (and offset, last) minimising Σ w·(x - value of the weight's pattern)², from
        the per-pattern sums: ``counts[k]`` = Σ w and ``sums[k]`` = Σ w·x over the weights that
        use pattern k; ``design`` (m, p) holds each pattern's signs (and a 1 for the offset)."""
        m, p = design.shape
        for a in range(p):
            rhs[a] = 0.0
            for b in range(a, p):
                gram[a, b] = 0.0
        for k in range(m):
            if counts[k] == 0.0 and sums[k] == 0.0:
                continue
            for a in range(p):
                da = design[k, a]
                rhs[a] += sums[k] * da
                wa = counts[k] * da
                for b in range(a, p):
                    gram[a, b] += wa * design[k, b]
        _solve(gram, rhs, solution, p)

    @njit(cache=True)
    def _values(design, solution, values):  # pragma: no cover
        """Each pattern's value Σ a_i·c_i (+ o) under ``solution``."""
        m, p = design.shape
        for k in range(m):
            value = 0.0
            for a in range(p):
                value += solution[a] * design[k, a]
            values[k] = value

    @njit(cache=True)
    def _error(squares, counts, sums, values):  # pragma: no cover
        """Σ w·(x - v)² from the sums: Σ w·x² - 2 Σ_k v_k·sums_k + Σ_k v_k²·counts_k."""
        total = squares
        for k in range(values.shape[0]):
            total += values[k] * (values[k] * counts[k] - 2.0 * sums[k])
        return total

    @njit(cache=True)
    def _nearest(x, w, values, pattern, counts, sums, order, midpoints):  # pragma: no cover
        """Each weight's pattern: the nearest value (``values``, unsorted); fills the sums."""
        m = values.shape[0]
        for c in range(m):  # insertion sort (stable: equal values keep the lower pattern)
            value = values[c]
            k = c
            while k > 0 and values[order[k - 1]] > value:
                order[k] = order[k - 1]
                k -= 1
            order[k] = c
        for k in range(m - 1):
            midpoints[k] = (values[order[k]] + values[order[k + 1]]) / 2
        for k in range(m):
            counts[k] = 0.0
            sums[k] = 0.0
        for j in range(x.shape[0]):
            # The first midpoint >= x (torch.searchsorted, left): the count of those below x,
            # without branches (2^q - 1 compares, cheaper than mispredicted bisection steps).
            below = 0
            for k in range(m - 1):
                below += midpoints[k] < x[j]
            chosen = order[below]
            pattern[j] = chosen
            counts[chosen] += w[j]
            sums[chosen] += w[j] * x[j]

    @njit(parallel=True, cache=True)
    def _alternate_groups(
        rows, weights, codes, alpha, offset, with_offset, iterations, table
    ):  # pragma: no cover
        """In place: codes (q, N, g), alpha (q, N), offset (N,) become each group's best iterate.

        Each weight's codes are one of the m = 2^q sign patterns (``table`` rows), so a group is
        held as one pattern index per weight, and the least-squares system and the error come
        from per-pattern sums (Σ w and Σ w·x): a round costs one pass over the group (the
        nearest pattern, by bisection), not the q² products per weight of the direct form.
        """
        q, n, g = codes.shape
        m = table.shape[0]
        p = q + 1 if with_offset else q
        design = np.ones((m, p))
        design[:, :q] = table
        for r in prange(n):
            x = rows[r].astype(np.float64)
            w = weights[r].astype(np.float64)
            pattern = np.empty(g, dtype=np.int64)
            best_pattern = np.empty(g, dtype=np.int64)
            counts = np.zeros(m)
            sums = np.zeros(m)
            squares = 0.0
            for j in range(g):
                k = 0
                for i in range(q):
                    if codes[i, r, j] > 0:
                        k |= 1 << i  # table row k holds bit i of k as the sign of plane i
                pattern[j] = k
                best_pattern[j] = k
                counts[k] += w[j]
                sums[k] += w[j] * x[j]
                squares += w[j] * x[j] * x[j]
            best = np.empty(p)
            for i in range(q):
                best[i] = alpha[i, r]
            if with_offset:
                best[q] = offset[r]
            values = np.empty(m)
            _values(design, best, values)
            best_error = _error(squares, counts, sums, values)
            solution = np.empty(p)
            gram = np.empty((p, p))
            rhs = np.empty(p)
            order = np.empty(m, dtype=np.int64)
            midpoints = np.empty(max(m - 1, 1))
            for round_ in range(iterations + 1 if iterations else 0):
                if round_:
                    _nearest(x, w, values, pattern, counts, sums, order, midpoints)
                _least_squares(design, counts, sums, gram, rhs, solution)
                _values(design, solution, values)
                error = _error(squares, counts, sums, values)
                if error < best_error:
                    best_error = error
                    best[:] = solution
                    best_pattern[:] = pattern
            for i in range(q):
                alpha[i, r] = best[i]
                for j in range(g):
                    codes[i, r, j] = table[best_pattern[j], i]
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
