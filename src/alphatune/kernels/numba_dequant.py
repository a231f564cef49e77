"""Dequantize packed BCQ codes to a dense float32 weight on CPU (numba), parallel over rows.

Same result as ``alphatune.kernels.reference.dequantize_packed``: ``W[r, j] = Σ_i α_i[r, g(j)]·B_i[r, j]
(+ offset[r, g(j)])``. The torch reference unpacks every bit into a full int64/float tensor per
plane; here every code byte selects its 8 signs from a 256 × 8 table and the planes are summed
in registers, so the only full-size memory traffic is writing W once.

This is what makes the batched path (prefill, training) cheap: dequantize per call, then one
GEMM, without keeping a dense copy of the weight around.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor

from alphatune.errors import KernelUnavailableError
from alphatune.kernels.numba_threads import numba_threads, threads_for
from alphatune_runtime.dequant import SIGNS

try:
    from numba import njit, prange

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    _IMPORT_ERROR = exc

# Entries 8m..8m+7: the 8 codes (±1) that byte value m encodes, least significant bit first (the
# engine's sign table, flat).
_SIGNS = SIGNS.reshape(-1)


def available() -> bool:
    """True when numba imported."""
    return _IMPORT_ERROR is None


_ROWS_PER_TASK = 64  # parallel work item
_MIN_PARALLEL_BYTES = 1 << 18  # code bytes below which one thread beats a thread launch


if _IMPORT_ERROR is None:

    @njit(cache=True)
    def _dequantize_rows(
        packed, alpha, offset, with_offset, bytes_per_group, signs, first, last, out
    ):  # pragma: no cover - numba
        """Rows first..last-1 of out (rows, 8·n_bytes): groups made of whole bytes."""
        bits, _, n_bytes = packed.shape
        n_groups = alpha.shape[2]
        for r in range(first, last):
            row = out[r]
            for g in range(n_groups):
                # Loops per group rather than k // bytes_per_group per byte: a division per
                # byte cost more than the arithmetic.
                begin, end = g * bytes_per_group, min(n_bytes, (g + 1) * bytes_per_group)
                row[8 * begin : 8 * end] = offset[r, g] if with_offset else np.float32(0.0)
                for i in range(bits):
                    a = alpha[i, r, g]
                    for k in range(begin, end):
                        # Unsigned indices: numba adds a negative-index check to signed ones.
                        signs_at = np.uint64(packed[i, r, k]) * np.uint64(8)
                        row_at = np.uint64(8 * k)
                        for b in range(np.uint64(8)):
                            row[row_at + b] += a * signs[signs_at + b]

    @njit(parallel=True, cache=True)
    def _dequantize_rows_parallel(
        packed, alpha, offset, with_offset, bytes_per_group, signs, out
    ):  # pragma: no cover - numba
        rows = packed.shape[1]
        for task in prange((rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
            first = task * _ROWS_PER_TASK
            last = min(rows, first + _ROWS_PER_TASK)
            _dequantize_rows(
                packed, alpha, offset, with_offset, bytes_per_group, signs, first, last, out
            )

    @njit(cache=True)
    def _dequantize_elements(
        packed, alpha, offset, with_offset, group_size, out
    ):  # pragma: no cover
        """Groups that split a byte: one output at a time (rare layouts; serial)."""
        bits, rows, _ = packed.shape
        for r in range(rows):
            for g in range(alpha.shape[2]):
                for j in range(g * group_size, (g + 1) * group_size):
                    value = offset[r, g] if with_offset else np.float32(0.0)
                    for i in range(bits):
                        bit = (packed[i, r, j >> 3] >> (j & 7)) & 1
                        value += alpha[i, r, g] if bit else -alpha[i, r, g]
                    out[r, j] = value


_WORKSPACES = threading.local()


def _workspace(rows: int, columns: int) -> Tensor:
    """This thread's float32 buffer of one shape (one per shape: a few layer shapes per model)."""
    buffers = getattr(_WORKSPACES, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACES.buffers = {}
    if (rows, columns) not in buffers:
        buffers[(rows, columns)] = torch.empty(rows, columns, dtype=torch.float32)
    return buffers[(rows, columns)]


def dequantize_fast(
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
    reuse: bool = False,
) -> Tensor:
    """Dense ``(out, in)`` float32 weight from CPU packed codes; see ``reference.dequantize_packed``.

    ``reuse=True`` writes into this thread's workspace for the shape instead of a fresh tensor
    (a fresh 64 MB tensor costs ~16k page faults, as much as the dequantization itself): the
    result is only valid until the next ``reuse=True`` call of the same shape, so it suits a
    weight consumed at once (one ``F.linear``), not one kept for backward.
    """
    if _IMPORT_ERROR is not None:
        raise KernelUnavailableError(
            "fast dequantization needs numba (`pip install numba`)"
        ) from _IMPORT_ERROR
    if any(t is not None and t.device.type != "cpu" for t in (packed, alpha, offset)):
        raise KernelUnavailableError("fast dequantization runs on CPU tensors only")
    bits, rows, n_bytes = packed.shape
    codes = packed.detach().contiguous().numpy()
    scales = alpha.detach().to(torch.float32).contiguous().numpy()
    with_offset = offset is not None
    shift = (
        offset.detach().to(torch.float32).contiguous().numpy()
        if with_offset
        else np.zeros((1, 1), np.float32)  # one compiled signature for both cases
    )
    n_groups = in_features // group_size
    if n_groups > 1 and group_size % 8:
        out = torch.empty(rows, in_features, dtype=torch.float32)
        _dequantize_elements(codes, scales, shift, with_offset, group_size, out.numpy())
        return out
    padded = _workspace(rows, 8 * n_bytes) if reuse else torch.empty(rows, 8 * n_bytes)
    if padded.numel() == 0:
        return padded[:, :in_features]
    bytes_per_group = n_bytes if n_groups == 1 else group_size // 8
    args = (codes, scales, shift, with_offset, bytes_per_group, _SIGNS)
    threads = threads_for(rows * n_bytes * bits, _MIN_PARALLEL_BYTES)
    if threads > 1:
        with numba_threads(threads):
            _dequantize_rows_parallel(*args, padded.numpy())
    else:
        _dequantize_rows(*args, 0, rows, padded.numpy())
    return padded if padded.shape[1] == in_features else padded[:, :in_features].contiguous()
