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
from alphatune_runtime.weights import NativeWeights, Projection
from alphatune_runtime.weights import build_weights as lay_out

# A block's norms in the order the step reads them (``native.LLAMA_MLP_NORMS`` and
# ``native.SANDWICH_MLP_NORMS`` say which slot is which): Llama's, and with sandwich norms
# (Gemma-3) the norms of the attention's and the MLP's outputs too.
NORMS = ("input_layernorm", "post_attention_layernorm")
SANDWICH_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


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
        sandwich = spec.shape.block.sandwich_norms
        names = SANDWICH_NORMS if sandwich else NORMS
        norms = np.stack(
            [np.stack([_norm_weight(b.get_submodule(n)) for n in names]) for b in spec.blocks]
        )
        qk_norms = None
        if spec.shape.block.qk_norm:
            qk_norms = np.stack(
                [
                    np.stack([_norm_weight(b.get_submodule(n)) for n in QK_NORMS])
                    for b in spec.blocks
                ]
            )
        return lay_out(projections, norms, _norm_weight(spec.final_norm), kernel, qk_norms)


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


def _norm_weight(norm: torch.nn.Module) -> np.ndarray:
    """What the step multiplies a normed vector by: Llama's weight, or Gemma's ``1 + weight``
    (in float32, as Gemma's RMSNorm computes it)."""
    weight = getattr(norm, "weight", None)
    kind = type(norm).__name__
    if weight is None or kind not in ("LlamaRMSNorm", "Gemma3RMSNorm"):
        raise UnsupportedModelError(f"norm {kind} is not Llama's or Gemma-3's RMSNorm")
    weight = weight.detach().float()
    if kind == "Gemma3RMSNorm":
        weight = 1.0 + weight
    return weight.contiguous().numpy().copy()
