"""The layout every LUT kernel reads, made from numpy arrays: codes, scales and a layer's operands.

- ``prepare_codes``: the codes of a layer reordered so that the code bytes of ``rows`` consecutive
  rows are contiguous, rows padded with zero codes to a multiple of ``rows`` (16 for AVX-512, 32
  for AVX2);
- ``scales_rows_inner`` / ``scales_in_layer_order``: the scales in one of the two layouts the
  kernels read (``PreparedScales``): rows contiguous (AVX-512 loads 16 rows' scales at once), or
  the layers' own order, read in place without a copy (AVX2 applies a group's scales once per
  plane, so it can afford gathering them);
- ``layer_operands``: a layer's prepared codes, scales and offset checked against a kernel and
  converted for its numba entry, once.

``alphatune.kernels.lut_common`` takes tensors and hands their numpy views to these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alphatune_runtime.errors import ConfigError, KernelUnavailableError

NO_OFFSET = np.zeros((1, 1), np.float32)  # one compiled signature with and without an offset

# The two layouts of ``PreparedScales``: the last two dimensions of ``first`` and ``rest``.
ROWS_INNER = "rows-inner"  # (G, padded out): a row block's scales of one group are contiguous
LAYER_ORDER = "layer-order"  # (padded out, G): the layers' own order (BCQLinear's α)


def packed_width(in_features: int) -> int:
    """Bytes per packed row of codes (8 codes a byte)."""
    return (in_features + 7) // 8


def supports(group_size: int, in_features: int) -> bool:
    """Whether the LUT kernels handle this layer layout (groups must not split a code byte)."""
    return group_size == in_features or group_size % 8 == 0


@dataclass(frozen=True)
class PreparedCodes:
    """A layer's codes in a kernel's layout: ``(q, ceil(out/rows), ceil(in/8), rows)`` uint8."""

    codes: np.ndarray
    out_features: int
    in_features: int


@dataclass(frozen=True)
class PreparedScales:
    """Scales in a kernel's layout, rows padded with zero scales to a multiple of the row block.

    ``first``: α₁ of each scale set (one set, or one per adapter), ``(S, G, out)`` or
    ``(S, out, G)`` by ``layout``; ``rest``: the other planes' scales, shared by every set,
    ``(q-1, G, out)`` or ``(q-1, out, G)``. In ``LAYER_ORDER`` they may be views of the layer's
    own arrays (``scales_in_layer_order``): whoever holds them reads the layer's current values.
    """

    first: np.ndarray
    rest: np.ndarray
    layout: str = ROWS_INNER

    def shape_for(self, sets: int, out: int, groups: int) -> tuple[int, int, int]:
        """The shape ``first`` (``sets`` = S) or ``rest`` (``sets`` = q-1) must have."""
        return (sets, groups, out) if self.layout == ROWS_INNER else (sets, out, groups)


def prepared_codes_shape(packed_shape: tuple[int, ...], rows: int) -> tuple[int, int, int, int]:
    """The shape ``prepare_codes`` gives codes of ``packed_shape`` ``(q, out, ceil(in/8))``."""
    bits, out_features, n_bytes = packed_shape
    return (bits, -(-out_features // rows), n_bytes, rows)


def prepare_codes(
    packed: np.ndarray,
    in_features: int,
    rows: int,
    byte_map: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> PreparedCodes:
    """Reorder packed codes ``(q, out, ceil(in/8))`` uint8 so ``rows`` rows' bytes are contiguous.

    ``byte_map`` (256 uint8) rewrites every byte on the way (a kernel's nibble order); ``out``
    (C-contiguous uint8 of the prepared shape) receives the result, so a caller that keeps many
    layers in one buffer makes no temporary copy of any.
    """
    if packed.dtype != np.uint8 or packed.ndim != 3:
        raise ConfigError(
            f"packed codes must be uint8 (q, out, ceil(in/8)), got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    bits, out_features, n_bytes = packed.shape
    if n_bytes != packed_width(in_features):
        raise ConfigError(
            f"packed width {n_bytes} does not match in_features={in_features} "
            f"(expected {packed_width(in_features)} bytes per row)"
        )
    shape = prepared_codes_shape(packed.shape, rows)
    blocks = shape[1]
    if out is None:
        out = np.empty(shape, np.uint8)
    if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ConfigError(f"out must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}")
    whole = out_features // rows
    for plane in range(bits):
        # (blocks, rows, bytes) -> (blocks, bytes, rows), written straight into out.
        _copy_bytes(packed[plane, : whole * rows].reshape(whole, rows, n_bytes).transpose(0, 2, 1),
                    out[plane, :whole], byte_map)  # fmt: skip
        if whole < blocks:  # the last block's rows past out_features are zero codes
            last = out[plane, whole]
            last[...] = 0 if byte_map is None else byte_map[0]
            _copy_bytes(packed[plane, whole * rows :].T, last[:, : out_features - whole * rows],
                        byte_map)  # fmt: skip
    return PreparedCodes(out, out_features, in_features)


def _copy_bytes(source: np.ndarray, target: np.ndarray, byte_map: np.ndarray | None) -> None:
    if byte_map is None:
        np.copyto(target, source)
    else:  # mode="clip": no bounds check, so numpy writes into target without a buffer
        np.take(byte_map, source, out=target, mode="clip")


def _padded(out: int, rows: int) -> int:
    return -(-out // rows) * rows


def _rows_contiguous(scales: np.ndarray, rows: int) -> np.ndarray:
    """``(..., out, G)`` -> ``(..., G, padded out)`` float32 (a copy)."""
    *lead, out, groups = scales.shape
    result = np.zeros((*lead, groups, _padded(out, rows)), np.float32)
    result[..., :out] = np.swapaxes(scales, -1, -2)
    return result


def _in_layer_order(scales: np.ndarray, rows: int) -> np.ndarray:
    """``(..., out, G)`` -> ``(..., padded out, G)`` float32: ``scales`` itself when it is float32,
    C-contiguous and of whole row blocks, else a (padded) copy."""
    *lead, out, groups = scales.shape
    padded = _padded(out, rows)
    if padded == out and scales.dtype == np.float32 and scales.flags.c_contiguous:
        return scales
    result = np.zeros((*lead, padded, groups), np.float32)
    result[..., :out, :] = scales
    return result


def scales_rows_inner(first_sets: np.ndarray, rest: np.ndarray, rows: int) -> PreparedScales:
    """α₁ sets ``(S, out, G)`` and the other planes ``(q-1, out, G)``, rows contiguous (a copy)."""
    return PreparedScales(
        _rows_contiguous(first_sets, rows), _rows_contiguous(rest, rows), ROWS_INNER
    )


def scales_in_layer_order(first_sets: np.ndarray, rest: np.ndarray, rows: int) -> PreparedScales:
    """α₁ sets ``(S, out, G)`` and the other planes ``(q-1, out, G)`` as they are: the arrays
    themselves (no copy) when they are float32, contiguous and ``out`` is a multiple of ``rows``."""
    return PreparedScales(
        _in_layer_order(first_sets, rows), _in_layer_order(rest, rows), LAYER_ORDER
    )


@dataclass(frozen=True)
class LayerOperands:
    """What a kernel's numba entry takes of a layer, checked once (``layer_operands``)."""

    codes: np.ndarray  # (q, blocks, ceil(in/8), rows) uint8
    first: np.ndarray  # (S, G, padded out) or (S, padded out, G) float32: see PreparedScales
    rest: np.ndarray  # (q-1, G, padded out) or (q-1, padded out, G) float32
    offset: np.ndarray  # (out, G) float32, or NO_OFFSET
    with_offset: bool
    group_size: int
    n_groups: int
    bytes_per_group: int
    in_features: int
    out_features: int
    work_per_token: int  # code bits read per token: what decides the thread count


def layer_operands(
    prepared: PreparedCodes,
    scales: PreparedScales,
    offset: np.ndarray | None,
    group_size: int,
    rows: int,
    layout: str,
) -> LayerOperands:
    """Check a layer's prepared codes, scales and offset ``(out, G)`` against a kernel with
    ``rows``-row blocks that reads scales in ``layout``, and convert them for its numba entry."""
    in_features = prepared.in_features
    bits, n_blocks, n_bytes, block_rows = prepared.codes.shape
    if block_rows != rows:
        raise ConfigError(
            f"codes were prepared in blocks of {block_rows} rows, this kernel takes {rows}: "
            "prepare them with this kernel's prepare_codes"
        )
    if not supports(group_size, in_features) or in_features % group_size:
        raise KernelUnavailableError(
            f"the LUT kernel needs groups that do not split a code byte: group_size must divide "
            f"in_features={in_features} and be a multiple of 8 (or equal it), got {group_size}"
        )
    if scales.layout != layout:
        raise ConfigError(
            f"scales were prepared in the {scales.layout} layout, this kernel reads {layout}: "
            "prepare them with this kernel's prepare_scales"
        )
    n_groups = in_features // group_size
    sets = scales.first.shape[0] if scales.first.ndim == 3 else 0
    first_shape = scales.shape_for(sets, n_blocks * rows, n_groups)
    rest_shape = scales.shape_for(bits - 1, n_blocks * rows, n_groups)
    if scales.first.shape != first_shape or scales.rest.shape != rest_shape:
        raise ConfigError(
            f"scales ({scales.layout}) must be {first_shape} and {rest_shape}, "
            f"got {scales.first.shape} and {scales.rest.shape}"
        )
    if any(a.dtype != np.float32 or not a.flags.c_contiguous for a in (scales.first, scales.rest)):
        raise ConfigError(
            f"scales must be C-contiguous float32 arrays, got {scales.first.dtype} and "
            f"{scales.rest.dtype}"
        )
    out = prepared.out_features
    if offset is not None and tuple(offset.shape) != (out, n_groups):
        raise ConfigError(
            f"offset must have shape (out, in/group_size) = {(out, n_groups)}, "
            f"got {tuple(offset.shape)}"
        )
    return LayerOperands(
        codes=prepared.codes,
        first=scales.first,
        rest=scales.rest,
        offset=NO_OFFSET if offset is None else np.ascontiguousarray(offset, np.float32),
        with_offset=offset is not None,
        group_size=group_size,
        n_groups=n_groups,
        bytes_per_group=n_bytes if n_groups == 1 else group_size // 8,
        in_features=in_features,
        out_features=out,
        work_per_token=bits * n_blocks * rows * 8 * n_bytes,
    )
