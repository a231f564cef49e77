"""The blocks' weights in the form the numba step reads: flat buffers of the kernel's operands.

Every projection's codes (in the kernel's layout), scales, offset and bias are laid end to end in
one buffer per kind; ``ints`` says where each starts and its shape (``native``'s columns). The
engine owns this copy: codes are prepared per layer and copied in, nothing is kept in the layers,
and a layer's stored codes, when they are a view of the file the base was loaded from, are paged
out (``memory.page_out``).
Scales are the layer's own α, or, for a mixed batch, every adapter's α₁ from the bank
(``alphatune.mixed``) as the kernel's scale sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alphatune.engine import native
from alphatune.engine.spec import LlamaSpec
from alphatune.errors import UnsupportedModelError
from alphatune.kernels import lut_common
from alphatune.layers import BCQLinear
from alphatune.memory import page_out


@dataclass
class NativeWeights:
    """Operands of ``native.forward_tokens`` for every projection (block·7 + index)."""

    codes: np.ndarray  # flat uint8
    first: np.ndarray  # flat float32
    rest: np.ndarray
    offsets: np.ndarray
    biases: np.ndarray
    ints: np.ndarray  # (L·7, native.INT_COLUMNS) int64
    norms: np.ndarray  # (L, 2, H) float32
    final_norm: np.ndarray  # (H,) float32
    banked: bool  # some projection holds an adapter bank (scale sets per token)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.first, self.rest, self.offsets, self.biases))


class _FlatBuffer:
    """A buffer of known size that arrays are copied into end to end; ``put`` says where.

    Sized before any layer is prepared (``_sizes``), so building never holds two copies of the
    codes: each layer's prepared form is copied in and dropped.
    """

    def __init__(self, size: int, dtype: type) -> None:
        # One spare element: an empty buffer still has a valid data pointer for numba.
        self.array = np.zeros(size + 1, dtype)
        self.used = 0

    def put(self, array: np.ndarray) -> int:
        at, flat = self.used, array.reshape(-1)
        self.array[at : at + flat.size] = flat
        self.used += flat.size
        return at


def _sizes(layers: list[tuple[BCQLinear, bool]], rows: int) -> tuple[int, ...]:
    """Elements of codes, α₁ sets, other scales, offsets and biases over ``(layer, banked)``."""
    totals = [0] * 5
    for layer, banked in layers:
        bits, out, n_bytes = layer.packed_codes.shape
        padded = -(-out // rows) * rows
        groups = layer.in_features // layer.group_size
        sets = layer.alpha1_bank.shape[0] if banked else 1  # type: ignore[union-attr]
        totals[0] += bits * padded * n_bytes
        totals[1] += sets * groups * padded
        totals[2] += (bits - 1) * groups * padded
        totals[3] += 1 if layer.offset is None else out * groups
        totals[4] += 0 if layer.bias is None else out
    return tuple(totals)


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
    sizes = _sizes(layers, rows)
    codes = _FlatBuffer(sizes[0], np.uint8)
    first, rest, offsets, biases = (_FlatBuffer(n, np.float32) for n in sizes[1:])
    ints = np.zeros((len(layers), native.INT_COLUMNS), np.int64)
    banked_any = False
    with torch.no_grad():
        for index, (layer, banked) in enumerate(layers):
            operands = _layer_operands(layer, kernel, rows, banked)
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
            row[native.CODES_AT] = codes.put(operands.codes)
            # The layer's own codes are now read only off the decode path (the transformers
            # forward, saving, hashing): where they are a view of the loaded file, their pages
            # leave memory until then, so that decode holds one copy of the codes, not two.
            page_out(layer.packed_codes)
            row[native.FIRST_AT] = first.put(operands.first)
            row[native.REST_AT] = rest.put(operands.rest)
            row[native.OFFSET_AT] = offsets.put(operands.offset)
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
    if norms.shape[-1] != spec.hidden:
        raise UnsupportedModelError(
            f"norm weights of width {norms.shape[-1]}, hidden {spec.hidden}"
        )
    assert all(b.used == n for b, n in zip((codes, first, rest, offsets, biases), sizes))
    return NativeWeights(
        codes.array, first.array, rest.array, offsets.array, biases.array, ints, norms,
        final_norm, banked_any,
    )  # fmt: skip


def _layer_operands(
    layer: BCQLinear, kernel: Any, rows: int, banked: bool
) -> lut_common.LayerOperands:
    if not lut_common.supports(layer.group_size, layer.in_features):
        raise UnsupportedModelError(
            f"group size {layer.group_size} of a {layer.in_features}-input layer splits a code "
            "byte; the LUT kernel needs multiples of 8"
        )
    prepared = kernel.module.prepare_codes(layer.packed_codes, layer.in_features)
    alpha_rest = layer.alpha_rest.detach().float()
    if banked:
        first_sets = layer.alpha1_bank.detach().float()  # (A, out, G)
    else:
        first_sets = layer.effective_alpha1().detach().float()[None]  # (1, out, G)
    scales = kernel.module.prepare_scales(first_sets, alpha_rest)
    return lut_common.layer_operands(prepared, scales, layer.offset, layer.group_size, rows)


def _norm_weight(norm: torch.nn.Module) -> np.ndarray:
    weight = getattr(norm, "weight", None)
    if weight is None or type(norm).__name__ not in ("LlamaRMSNorm",):
        raise UnsupportedModelError(f"norm {type(norm).__name__} is not Llama's RMSNorm")
    return weight.detach().float().contiguous().numpy().copy()
