"""The static KV cache: preallocated once per request, sized to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from alphatune_runtime.stack import Shape


@dataclass
class KVCache:
    """Keys and values ``(L, rows, kv heads, max_len, d)`` float32, and each row's filled length.

    ``max_len`` is the longest prompt plus the new tokens of the request, so the cache never grows
    and decode never copies it. Entries past a row's length are stale, never read: a token attends
    to its own row's positions ``0..position`` only.
    """

    keys: np.ndarray
    values: np.ndarray
    lengths: np.ndarray  # (rows,) int64

    @classmethod
    def allocate(cls, shape_of: Shape, rows: int, max_len: int) -> KVCache:
        shape = (shape_of.n_layers, rows, shape_of.n_kv_heads, max_len, shape_of.head_dim)
        # np.empty: pages are touched only as positions fill, so a generous max_len costs
        # address space, not resident memory.
        return cls(
            np.empty(shape, np.float32), np.empty(shape, np.float32), np.zeros(rows, np.int64)
        )

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
