"""The blocks' weights in the form the numba step reads: the kernel's operands of every projection.

Codes (in the kernel's layout) and biases are laid end to end in one flat buffer per kind, which
the engine owns: each layer's codes are prepared straight into it, nothing is kept in the layers,
and a layer's stored codes, when they are a view of the file the base was loaded from, are paged out
(``memory.page_out``), so decode holds one copy of the codes.
Scales and offsets are passed by address (``ints`` says where every operand is and its shape,
``native``'s columns). A kernel that reads scales in the layers' own order (AVX2) reads the
layer's tensors in place, so decode holds one copy of the scales too; the engine keeps every such
array alive (``NativeWeights.held``) and reads what the layer holds at each call (an edit in place
shows; a replaced tensor does not: build again). Other layouts, and scales the layer computes
(a trainable multiplier on α₁), are the engine's own arrays.
Scales are the layer's own α, or, for a mixed batch, every adapter's α₁ from the bank
(``alphatune.mixed``) as the kernel's scale sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alphatune.engine.spec import LlamaSpec
from alphatune.errors import UnsupportedModelError
from alphatune.kernels import lut_common
from alphatune.layers import BCQLinear
from alphatune.memory import page_out
from alphatune_runtime import native


@dataclass
class NativeWeights:
    """Operands of ``native.forward_tokens`` for every projection (block·7 + index)."""

    codes: np.ndarray  # flat uint8
    biases: np.ndarray  # flat float32
    held: list[np.ndarray]  # every array whose address ``ints`` holds (kept alive here)
    ints: np.ndarray  # (L·7, native.INT_COLUMNS) int64
    norms: np.ndarray  # (L, 2, H) float32
    final_norm: np.ndarray  # (H,) float32
    banked: bool  # some projection holds an adapter bank (scale sets per token)

    def nbytes(self) -> int:
        """Bytes of every operand the kernel reads (scales shared with the layers included)."""
        return self.codes.nbytes + self.biases.nbytes + sum(a.nbytes for a in self.held)


class _FlatBuffer:
    """A buffer of known size that arrays are laid into end to end; ``put`` / ``reserve`` say where.

    Sized before any layer is prepared (``_sizes``), so building never holds two copies of the
    codes: each layer's codes are prepared straight into their place.
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


def _sizes(layers: list[BCQLinear], rows: int) -> tuple[int, int]:
    """Elements of the codes (in ``rows``-row blocks) and of the biases of ``layers``."""
    codes = biases = 0
    for layer in layers:
        codes += int(np.prod(lut_common.prepared_codes_shape(layer.packed_codes.shape, rows)))
        biases += 0 if layer.bias is None else layer.out_features
    return codes, biases


def _address(array: np.ndarray, held: list[np.ndarray]) -> int:
    """Where ``array`` (C-contiguous) is in memory; it is kept alive in ``held``."""
    assert array.flags.c_contiguous
    held.append(array)
    return int(array.ctypes.data)


def build_weights(spec: LlamaSpec, kernel: Any, use_bank: bool) -> NativeWeights:
    """Convert the blocks of ``spec`` for ``kernel`` (``kernels.decode_kernel()``).

    ``use_bank``: projections that hold an adapter bank use it (one scale set per adapter);
    otherwise every projection uses its own α (an adapter loaded with ``load_adapter`` included).
    """
    rows = kernel.module.ROWS
    layers = []
    for block in spec.blocks:
        for name in native.PROJECTIONS:
            layer = block.get_submodule(name)
            assert isinstance(layer, BCQLinear)  # checked by spec.describe
            layers.append((layer, use_bank and layer.alpha1_bank is not None))
    code_size, bias_size = _sizes([layer for layer, _ in layers], rows)
    codes, biases = _FlatBuffer(code_size, np.uint8), _FlatBuffer(bias_size, np.float32)
    held: list[np.ndarray] = []
    ints = np.zeros((len(layers), native.INT_COLUMNS), np.int64)
    banked_any = False
    with torch.no_grad():
        for index, (layer, banked) in enumerate(layers):
            shape = lut_common.prepared_codes_shape(layer.packed_codes.shape, rows)
            at, codes_view = codes.reserve(shape)
            operands = _layer_operands(layer, kernel, rows, banked, codes_view)
            row = ints[index]
            row[native.GROUP_SIZE] = operands.group_size
            row[native.N_GROUPS] = operands.n_groups
            row[native.BYTES_PER_GROUP] = operands.bytes_per_group
            row[native.WITH_OFFSET] = int(operands.with_offset)
            row[native.OUT_FEATURES] = operands.out_features
            row[native.BANKED] = int(banked)
            row[native.HAS_BIAS] = int(layer.bias is not None)
            row[native.WORK] = operands.work_per_token
            row[native.BITS], row[native.BLOCKS], row[native.N_BYTES], row[native.ROWS] = (
                operands.codes.shape
            )
            row[native.N_SETS] = operands.first.shape[0]
            row[native.SCALE_DIM_1], row[native.SCALE_DIM_2] = operands.first.shape[1:]
            row[native.CODES_AT] = at
            # The layer's own codes are now read only off the decode path (the transformers
            # forward, saving, hashing): where they are a view of the loaded file, their pages
            # leave memory until then, so that decode holds one copy of the codes, not two.
            page_out(layer.packed_codes)
            row[native.FIRST_ADDRESS] = _address(operands.first, held)
            row[native.REST_ADDRESS] = _address(operands.rest, held)
            row[native.OFFSET_ADDRESS] = _address(operands.offset, held)
            if layer.bias is not None:
                row[native.BIAS_AT] = biases.put(layer.bias.detach().float().numpy())
            banked_any |= banked
        norms = np.stack(
            [
                np.stack(
                    [_norm_weight(b.input_layernorm), _norm_weight(b.post_attention_layernorm)]
                )
                for b in spec.blocks
            ]
        )
        final_norm = _norm_weight(spec.final_norm)
    _check_shared_inputs(ints)
    if norms.shape[-1] != spec.hidden:
        raise UnsupportedModelError(
            f"norm weights of width {norms.shape[-1]}, hidden {spec.hidden}"
        )
    assert codes.used == code_size and biases.used == bias_size
    return NativeWeights(codes.array, biases.array, held, ints, norms, final_norm, banked_any)


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


def _layer_operands(
    layer: BCQLinear, kernel: Any, rows: int, banked: bool, codes_out: np.ndarray
) -> lut_common.LayerOperands:
    if not lut_common.supports(layer.group_size, layer.in_features):
        raise UnsupportedModelError(
            f"group size {layer.group_size} of a {layer.in_features}-input layer splits a code "
            "byte; the LUT kernel needs multiples of 8"
        )
    prepared = kernel.module.prepare_codes(layer.packed_codes, layer.in_features, codes_out)
    alpha_rest = layer.alpha_rest.detach().float()
    if banked:
        first_sets = layer.alpha1_bank.detach().float()  # (A, out, G)
    else:
        first_sets = layer.effective_alpha1().detach().float()[None]  # (1, out, G)
    scales = kernel.module.prepare_scales(first_sets, alpha_rest)
    return lut_common.layer_operands(
        prepared, scales, layer.offset, layer.group_size, rows, kernel.module.SCALES_LAYOUT
    )


def _norm_weight(norm: torch.nn.Module) -> np.ndarray:
    weight = getattr(norm, "weight", None)
    if weight is None or type(norm).__name__ not in ("LlamaRMSNorm",):
        raise UnsupportedModelError(f"norm {type(norm).__name__} is not Llama's RMSNorm")
    return weight.detach().float().contiguous().numpy().copy()
