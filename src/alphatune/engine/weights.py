"""The blocks' weights in the form the numba step reads: flat buffers of the kernel's operands.

Every projection's codes (in the kernel's layout), scales, offset and bias are laid end to end in
one buffer per kind; ``ints`` says where each starts and its shape (``native``'s columns). The
engine owns this copy: codes are prepared per layer and copied in, nothing is kept in the layers.
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
    """Arrays appended end to end; ``append`` returns where each starts."""

    def __init__(self, dtype: type) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0
        self.dtype = dtype

    def append(self, array: np.ndarray) -> int:
        at = self.size
        self.parts.append(np.ascontiguousarray(array, self.dtype).reshape(-1))
        self.size += self.parts[-1].size
        return at

    def join(self) -> np.ndarray:
        # One trailing element: an empty buffer still has a valid data pointer for numba.
        return np.concatenate([*self.parts, np.zeros(1, self.dtype)])


def build_weights(spec: LlamaSpec, kernel: Any, use_bank: bool) -> NativeWeights:
    """Convert the blocks of ``spec`` for ``kernel`` (``kernels.decode_kernel()``).

    ``use_bank``: projections that hold an adapter bank use it (one scale set per adapter);
    otherwise every projection uses its own α (an adapter loaded with ``load_adapter`` included).
    """
    codes, first, rest = _FlatBuffer(np.uint8), _FlatBuffer(np.float32), _FlatBuffer(np.float32)
    offsets, biases = _FlatBuffer(np.float32), _FlatBuffer(np.float32)
    ints = np.zeros((7 * spec.n_layers, native.INT_COLUMNS), np.int64)
    banked_any = False
    rows = kernel.module.ROWS
    with torch.no_grad():
        for block_index, block in enumerate(spec.blocks):
            for position, name in enumerate(native.PROJECTIONS):
                layer = block.get_submodule(name)
                assert isinstance(layer, BCQLinear)  # checked by spec.describe
                banked = use_bank and layer.alpha1_bank is not None
                operands = _layer_operands(layer, kernel, rows, banked)
                row = ints[7 * block_index + position]
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
                row[native.CODES_AT] = codes.append(operands.codes)
                row[native.FIRST_AT] = first.append(operands.first)
                row[native.REST_AT] = rest.append(operands.rest)
                row[native.OFFSET_AT] = offsets.append(operands.offset)
                if layer.bias is not None:
                    row[native.BIAS_AT] = biases.append(layer.bias.detach().float().numpy())
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
    return NativeWeights(
        codes.join(), first.join(), rest.join(), offsets.join(), biases.join(), ints, norms,
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
