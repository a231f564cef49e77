"""The activation tables every LUT kernel builds, and the offset term (numba; torch-free).

- ``build_tables``: for every 4 activations of a token, the 16 signed partial sums
  ``table[j, m] = Σ_b (bit b of m ? +x[4j+b] : -x[4j+b])`` (T-MAC's tables); activations past
  ``in_features`` count as 0, so the padding bits of a partial last code byte add nothing;
- ``add_offset``: the offset term ``offset · Σ x`` per group.

The layout the kernels share is ``layout``; the torch faces' checks are
``alphatune.kernels.lut_common``.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit

    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    IMPORT_ERROR = exc

if IMPORT_ERROR is None:

    @njit(cache=True)
    def build_tables(x, group_size, tables, group_sums, with_sums):  # pragma: no cover - numba
        """tables (T, 32·n_bytes) <- the 16 signed sums of every 4 activations; activations past
        in_features (a partial last byte) count as 0. group_sums (T, G) <- Σ x per group."""
        n_tokens, in_features = x.shape
        n_quads = tables.shape[1] // 16
        for t in range(n_tokens):
            for j in range(n_quads):
                base = 16 * j
                total = np.float32(0.0)
                for b in range(4):
                    if 4 * j + b < in_features:
                        total -= x[t, 4 * j + b]
                tables[t, base] = total
                step = 1
                for b in range(4):
                    twice = np.float32(0.0)
                    if 4 * j + b < in_features:
                        twice = np.float32(2.0) * x[t, 4 * j + b]
                    for m in range(step):
                        tables[t, base + step + m] = tables[t, base + m] + twice
                    step *= 2
            if with_sums:
                for g in range(group_sums.shape[1]):
                    total = np.float32(0.0)
                    for i in range(g * group_size, (g + 1) * group_size):
                        total += x[t, i]
                    group_sums[t, g] = total

    @njit(cache=True)
    def add_offset(y, offset, group_sums):  # pragma: no cover - numba
        """y[t, r] += Σ_g offset[r, g] · group_sums[t, g] (BCQ with offset)."""
        out, n_groups = offset.shape
        for t in range(y.shape[0]):
            for r in range(out):
                total = np.float32(0.0)
                for g in range(n_groups):
                    total += offset[r, g] * group_sums[t, g]
                y[t, r] += total
