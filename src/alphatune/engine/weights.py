"""The blocks' weights for the numba step, taken from a model's ``BCQLinear`` layers.

Each projection's codes, scales, offset and bias are handed to ``alphatune_runtime.weights`` as
numpy views of the layer's tensors (``Projection``), which lays them out for the kernel. The
layer's stored codes, when they are a view of the file the base was loaded from, are paged out
once laid out (``memory.page_out``), so decode holds one copy of the codes; a kernel that reads
scales in the layers' own order (AVX2) reads the layer's α in place, so an edit in place shows
at the next call (a replaced tensor does not: build again). Scales the layer computes (a
trainable multiplier on α₁) are the engine's own arrays.
Scales are the layer's own α, or, for a mixed batch, every adapter's α₁ from the bank
(``alphatune.mixed``) as the kernel's scale sets.
"""

from __future__ import annotations

import numpy as np
import torch

from alphatune.engine.spec import ModelSpec
from alphatune.errors import UnsupportedModelError
from alphatune.kernels.lut_common import _float32_numpy
from alphatune.layers import BCQLinear
from alphatune.memory import page_out
from alphatune_runtime import native
from alphatune_runtime.dispatch import NativeKernel
from alphatune_runtime.forms import QK_NORM_MODULES
from alphatune_runtime.weights import NativeWeights, Projection
from alphatune_runtime.weights import build_weights as lay_out

# The RMSNorm classes whose weights the step reads, and what each adds to its weight (Gemma's
# multiplies by 1 + weight): it must be the block form's ``norm_offset``.
NORM_OFFSETS = {"LlamaRMSNorm": 0.0, "Gemma3RMSNorm": 1.0}


def build_weights(spec: ModelSpec, kernel: NativeKernel, use_bank: bool) -> NativeWeights:
    """Convert the blocks of ``spec`` for ``kernel``.

    ``use_bank``: projections that hold an adapter bank use it (one scale set per adapter);
    otherwise every projection uses its own α (an adapter loaded with ``load_adapter`` included).
    """
    with torch.no_grad():
        projections = [
            _projection(block.get_submodule(name), use_bank)
            for block in spec.blocks
            for name in native.PROJECTIONS
        ]
        form = spec.shape.block

        def weights_of(names: tuple[str, ...]) -> np.ndarray:
            return np.stack(
                [
                    np.stack([_norm_weight(b.get_submodule(n), form.norm_offset) for n in names])
                    for b in spec.blocks
                ]
            )

        norms = weights_of(form.norm_modules)
        qk_norms = weights_of(QK_NORM_MODULES) if form.qk_norm else None
        final_norm = _norm_weight(spec.final_norm, form.norm_offset)
        return lay_out(projections, norms, final_norm, kernel, qk_norms)


def _projection(layer: BCQLinear, use_bank: bool) -> Projection:
    assert isinstance(layer, BCQLinear)  # checked by spec.describe
    banked = use_bank and layer.alpha1_bank is not None
    if banked:
        first_sets = layer.alpha1_bank.detach()  # (A, out, G)
    else:
        first_sets = layer.effective_alpha1().detach()[None]  # (1, out, G)
    codes = layer.packed_codes

    def release() -> None:
        # The layer's own codes are now read only off the decode path (the transformers
        # forward, saving, hashing): where they are a view of the loaded file, their pages
        # leave memory until then, so that decode holds one copy of the codes, not two.
        page_out(codes)

    return Projection(
        packed=codes.detach().cpu().numpy(),
        in_features=layer.in_features,
        group_size=layer.group_size,
        first_sets=_float32_numpy(first_sets),
        rest=_float32_numpy(layer.alpha_rest),
        offset=None if layer.offset is None else _float32_numpy(layer.offset),
        bias=None if layer.bias is None else _float32_numpy(layer.bias),
        banked=banked,
        release=release,
    )


def _norm_weight(norm: torch.nn.Module, offset: float) -> np.ndarray:
    """What the step multiplies a normed vector by: ``offset + weight`` in float32 (Llama: the
    weight; Gemma: ``1 + weight``, as its RMSNorm computes it)."""
    weight = getattr(norm, "weight", None)
    kind = type(norm).__name__
    if weight is None or NORM_OFFSETS.get(kind) != offset:
        raise UnsupportedModelError(
            f"norm {kind} in a block whose norms add {offset} to their weights (the step runs "
            f"{', '.join(NORM_OFFSETS)})"
        )
    return (offset + weight.detach().float()).contiguous().numpy().copy()
