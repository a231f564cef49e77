"""Products with a uniform 8-bit table on CPU: the torch face of ``alphatune_runtime.table``.

That module says how a compact embedding/head table (``alphatune.embedding``) is read with one
byte and one multiply-add per weight, and holds the numba loops with their numpy entry points.
This one takes and gives tensors: ``uniform_form`` (whether a table has the byte form),
``levels_from_planes`` / ``plane_bytes`` / ``planes_from_levels`` (packed planes, the stored
layout, to level bytes and back, with a torch path where numba is missing) and
``table_matmul`` (the product, on as many threads as the work pays for).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alphatune.kernels.numba_threads import numba_threads, threads_for
from alphatune.packing import pack_bits, packed_width, unpack_bits
from alphatune_runtime import table

_CONVERT_ROWS = 4096  # rows converted from planes to bytes at a time (torch path)


def available() -> bool:
    """True when numba imported."""
    return table.available()


def uniform_form(alpha: Tensor, offset: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(step, low)`` ``(rows, G)`` float32 if the plane scales are geometric, else ``None``.

    Args:
        alpha: ``(q, rows, G)`` plane scales, largest first (``fit_table``'s layout).
        offset: ``(rows, G)``.

    The test is exact (``α_p == a·2^(q-1-p)`` for every plane), so a table that satisfies it
    computes the same weights as its planes up to the float rounding of ``low``.
    """
    uniform = table.uniform_form(
        alpha.detach().float().cpu().numpy(), offset.detach().float().cpu().numpy()
    )
    if uniform is None:
        return None
    return tuple(torch.from_numpy(t).to(alpha.device) for t in uniform)  # type: ignore[return-value]


def levels_from_planes(packed: Tensor, dim: int, out: Tensor | None = None) -> Tensor:
    """Packed planes ``(q, rows, ceil(dim/8))`` (plane 0 the most significant bit) -> level
    bytes ``(rows, dim)`` uint8; ``q <= 8``. ``out``: a contiguous ``(rows, dim)`` uint8 tensor
    to write them into (returned), e.g. a slice of a larger table's levels."""
    q, rows, _ = packed.shape
    if q > 8:
        raise ValueError(f"level bytes hold at most 8 planes, got {q}")
    levels = torch.empty(rows, dim, dtype=torch.uint8, device=packed.device) if out is None else out
    if available() and packed.is_cpu:
        table.levels_from_planes(packed.numpy(), dim, levels.numpy())
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
            table._pack_plane_words(levels_np.view(np.uint64), shift, out)
        else:
            table._pack_plane(levels_np, shift, out)
        return torch.from_numpy(out)
    return pack_bits((levels >> shift) & 1)


def planes_from_levels(levels: Tensor, bits: int) -> Tensor:
    """``levels_from_planes``'s inverse: ``(rows, dim)`` uint8 -> ``(bits, rows, ceil(dim/8))``."""
    rows, dim = levels.shape
    planes = torch.empty(bits, rows, packed_width(dim), dtype=torch.uint8, device=levels.device)
    for plane in range(bits):
        planes[plane] = plane_bytes(levels, bits, plane)
    return planes


def table_matmul(x: Tensor, levels: Tensor, step: Tensor, low: Tensor, group_size: int) -> Tensor:
    """``x`` ``(T, dim)`` float32 times the table's transpose: ``(T, rows)`` float32.

    Args:
        levels: ``(rows, dim)`` uint8 level bytes (``levels_from_planes``).
        step, low: ``(rows, dim // group_size)`` float32 (``uniform_form``).
    """
    if table.IMPORT_ERROR is not None:
        raise ImportError("the byte table kernel needs numba") from table.IMPORT_ERROR
    x_np = np.ascontiguousarray(x.detach().float().numpy())
    rows, dim = levels.shape
    with numba_threads(threads_for(rows * dim * x_np.shape[0], table.MIN_PARALLEL_WORK)):
        out = table.table_matmul(x_np, levels.numpy(), step.numpy(), low.numpy(), group_size)
    return torch.from_numpy(out)
