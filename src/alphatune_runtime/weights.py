"""The blocks' weights in the form the numba step reads: the kernel's operands of every projection.

``WeightsBuilder`` (or ``build_weights``, over a list) takes every projection as numpy arrays
(``Projection``: the stored layout) and lays them out for a kernel. Codes (in the kernel's layout) and biases are laid end to end in one
flat buffer per kind, which the caller owns: each layer's codes are prepared straight into it,
and each projection's ``release`` runs once its codes are laid out (the caller pages out the
stored copy, so decode holds one copy of the codes).
Scales and offsets are passed by address (``ints`` says where every operand is and its shape,
``native``'s columns). A kernel that reads scales in the layers' own order (AVX2) reads the
given arrays in place, so decode holds one copy of the scales too; every such array is kept alive
here (``NativeWeights.held``), and an edit in place shows at the next call (a replaced array does
not: build again). Other layouts are arrays of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from alphatune_runtime import layout, native
from alphatune_runtime.dispatch import NativeKernel
from alphatune_runtime.errors import UnsupportedModelError


@dataclass(frozen=True)
class Projection:
    """One quantized projection as stored: codes, scales, offset and bias as numpy arrays."""

    packed: np.ndarray  # (q, out, ceil(in/8)) uint8, the packing layout
    in_features: int
    group_size: int
    first_sets: np.ndarray  # (S, out, G) float32: α₁ of each scale set (S adapters, or one)
    rest: np.ndarray  # (q-1, out, G) float32: the other planes' scales
    offset: np.ndarray | None  # (out, G) float32
    bias: np.ndarray | None  # (out,) float32
    banked: bool = False  # the scale sets are an adapter bank (one per token's adapter)
    release: Callable[[], None] | None = None  # called once the codes are laid out


@dataclass
class NativeWeights:
    """Operands of ``native.forward_tokens`` for every projection (block·7 + index)."""

    codes: np.ndarray  # flat uint8
    biases: np.ndarray  # flat float32
    held: list[np.ndarray]  # every array whose address ``ints`` holds (kept alive here)
    ints: np.ndarray  # (L·7, native.INT_COLUMNS) int64
    norms: np.ndarray  # (L, 2, H) float32, or (L, 4, H) for sandwich norms (forms.BlockForm)
    final_norm: np.ndarray  # (H,) float32
    banked: bool  # some projection holds an adapter bank (scale sets per token)
    # (L, 2, head_dim) float32: each block's query and key norm weights; (L, 2, 0) for a block
    # without them (Llama), never read then.
    qk_norms: np.ndarray

    def nbytes(self) -> int:
        """Bytes of every operand the kernel reads (scales shared with the layers included)."""
        return self.codes.nbytes + self.biases.nbytes + sum(a.nbytes for a in self.held)


class _FlatBuffer:
    """A buffer of known size that arrays are laid into end to end; ``put`` / ``reserve`` say where.

    Sized before any layer is prepared, so building never holds two copies of the codes: each
    layer's codes are prepared straight into their place.
    """

    def __init__(self, size: int, dtype: type) -> None:
        # One spare element: an empty buffer still has a valid data pointer for numba.
        self.array = np.zeros(size + 1, dtype)
        self.used = 0

    def put(self, array: np.ndarray) -> int:
        at, view = self.reserve(array.shape)
        view[...] = array
        return at

    def reserve(self, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
        """The next ``prod(shape)`` elements, as a C-contiguous view of ``shape``, and where."""
        at, count = self.used, int(np.prod(shape))
        self.used += count
        return at, self.array[at : at + count].reshape(shape)


def _address(array: np.ndarray, held: list[np.ndarray]) -> int:
    """Where ``array`` (C-contiguous) is in memory; it is kept alive in ``held``."""
    assert array.flags.c_contiguous
    held.append(array)
    return int(array.ctypes.data)


class WeightsBuilder:
    """Lays out projections one at a time (block by block, in ``native.PROJECTIONS`` order), so a
    caller that reads them from a file holds one layer's stored arrays at a time.

    Sized up front from every projection's packed shape and bias length; ``add`` each projection
    in order, then ``finish`` with the norms.
    """

    def __init__(
        self,
        kernel: NativeKernel,
        packed_shapes: Sequence[tuple[int, int, int]],
        bias_sizes: Sequence[int],
    ) -> None:
        per_block = len(native.PROJECTIONS)
        if len(packed_shapes) % per_block or len(packed_shapes) != len(bias_sizes):
            raise UnsupportedModelError(
                f"{len(packed_shapes)} projections: expected {per_block} a block"
            )
        self.kernel = kernel
        self.shapes = [layout.prepared_codes_shape(shape, kernel.rows) for shape in packed_shapes]
        self.codes = _FlatBuffer(sum(int(np.prod(shape)) for shape in self.shapes), np.uint8)
        self.biases = _FlatBuffer(sum(bias_sizes), np.float32)
        self.held: list[np.ndarray] = []
        self.ints = np.zeros((len(packed_shapes), native.INT_COLUMNS), np.int64)
        self.added = 0
        self.banked = False

    def add(self, projection: Projection) -> None:
        """Lay out the next projection; its ``release`` runs once its codes are copied."""
        index = self.added
        if index >= len(self.shapes):
            raise UnsupportedModelError(f"more than the {len(self.shapes)} projections sized")
        at, codes_view = self.codes.reserve(self.shapes[index])
        operands = _operands(projection, self.kernel, codes_view)
        row = self.ints[index]
        row[native.GROUP_SIZE] = operands.group_size
        row[native.N_GROUPS] = operands.n_groups
        row[native.BYTES_PER_GROUP] = operands.bytes_per_group
        row[native.WITH_OFFSET] = int(operands.with_offset)
        row[native.OUT_FEATURES] = operands.out_features
        row[native.BANKED] = int(projection.banked)
        row[native.HAS_BIAS] = int(projection.bias is not None)
        row[native.WORK] = operands.work_per_token
        row[native.BITS], row[native.BLOCKS], row[native.N_BYTES], row[native.ROWS] = (
            operands.codes.shape
        )
        row[native.N_SETS] = operands.first.shape[0]
        row[native.SCALE_DIM_1], row[native.SCALE_DIM_2] = operands.first.shape[1:]
        row[native.CODES_AT] = at
        if projection.release is not None:
            projection.release()
        row[native.FIRST_ADDRESS] = _address(operands.first, self.held)
        row[native.REST_ADDRESS] = _address(operands.rest, self.held)
        row[native.OFFSET_ADDRESS] = _address(operands.offset, self.held)
        if projection.bias is not None:
            row[native.BIAS_AT] = self.biases.put(projection.bias.astype(np.float32, copy=False))
        self.banked |= projection.banked
        self.added += 1

    def finish(
        self, norms: np.ndarray, final_norm: np.ndarray, qk_norms: np.ndarray | None = None
    ) -> NativeWeights:
        """The laid-out weights, with ``norms`` ``(L, 2, H)`` (each block's input and
        post-attention RMSNorm weights; ``(L, 4, H)`` with sandwich norms: input,
        post-attention, pre-MLP, post-MLP), ``final_norm`` ``(H,)`` and ``qk_norms``
        ``(L, 2, head_dim)`` (each block's query and key norms) or None."""
        if self.added != len(self.shapes):
            raise UnsupportedModelError(f"{self.added} of {len(self.shapes)} projections added")
        _check_shared_inputs(self.ints)
        hidden = final_norm.shape[0]
        blocks = len(self.shapes) // len(native.PROJECTIONS)
        if norms.shape not in ((blocks, 2, hidden), (blocks, 4, hidden)):
            raise UnsupportedModelError(
                f"norm weights of shape {norms.shape}, expected {(blocks, 2, hidden)} or "
                f"{(blocks, 4, hidden)}"
            )
        if qk_norms is not None and (qk_norms.ndim != 3 or qk_norms.shape[:2] != (blocks, 2)):
            raise UnsupportedModelError(
                f"query and key norm weights of shape {qk_norms.shape}, expected "
                f"{(blocks, 2)} + (head_dim,)"
            )
        assert self.codes.used == self.codes.array.size - 1
        assert self.biases.used == self.biases.array.size - 1
        return NativeWeights(
            self.codes.array,
            self.biases.array,
            self.held,
            self.ints,
            np.ascontiguousarray(norms, np.float32),
            np.ascontiguousarray(final_norm, np.float32),
            self.banked,
            np.zeros((blocks, 2, 0), np.float32)
            if qk_norms is None
            else np.ascontiguousarray(qk_norms, np.float32),
        )


def build_weights(
    projections: Sequence[Projection],
    norms: np.ndarray,
    final_norm: np.ndarray,
    kernel: NativeKernel,
    qk_norms: np.ndarray | None = None,
) -> NativeWeights:
    """Lay out ``projections`` (block by block, in ``native.PROJECTIONS`` order) for ``kernel``
    (``WeightsBuilder`` over a list). Raises ``UnsupportedModelError`` for a layout the kernel or
    the step cannot take."""
    builder = WeightsBuilder(
        kernel,
        [p.packed.shape for p in projections],
        [0 if p.bias is None else p.bias.shape[0] for p in projections],
    )
    for projection in projections:
        builder.add(projection)
    return builder.finish(norms, final_norm, qk_norms)


def _check_shared_inputs(ints: np.ndarray) -> None:
    """The projections that read one input (``native.SHARED_INPUTS``) share its tables, so they
    need the same grouping of its columns."""
    columns = [native.GROUP_SIZE, native.N_GROUPS, native.BYTES_PER_GROUP, native.N_BYTES]
    for base in range(0, len(ints), len(native.PROJECTIONS)):
        for first, count in native.SHARED_INPUTS:
            rows = ints[base + first : base + first + count][:, columns]
            if (rows != rows[0]).any():
                names = ", ".join(native.PROJECTIONS[first : first + count])
                raise UnsupportedModelError(
                    f"block {base // len(native.PROJECTIONS)}: {names} read the same input but "
                    f"are quantized with different groups (group size, groups, bytes: "
                    f"{rows[:, :3].tolist()}); the engine builds one input's tables once"
                )


def _operands(
    projection: Projection, kernel: NativeKernel, codes_out: np.ndarray
) -> layout.LayerOperands:
    if not layout.supports(projection.group_size, projection.in_features):
        raise UnsupportedModelError(
            f"group size {projection.group_size} of a {projection.in_features}-input layer "
            "splits a code byte; the LUT kernel needs multiples of 8"
        )
    prepared = kernel.prepare_codes(projection.packed, projection.in_features, codes_out)
    scales = kernel.prepare_scales(projection.first_sets, projection.rest)
    return layout.layer_operands(
        prepared, scales, projection.offset, projection.group_size, kernel.rows,
        kernel.scales_layout,
    )  # fmt: skip
