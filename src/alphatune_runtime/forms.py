"""What a block computes, by architecture: Llama's block and Gemma-3's, as the numba step runs them.

``BlockForm`` says how a block differs from Llama's (the defaults); ``gemma3_form`` reads
Gemma-3's from its ``config.json`` fields, refusing what the step does not run, so the decode
engine (from a transformers model) and the torch-free runtime (from a saved base) make the same
form and refuse the same models. The norm modules' names say where a block's norm weights are,
in the order the step reads them (``native.LLAMA_MLP_NORMS`` / ``native.SANDWICH_MLP_NORMS``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from alphatune_runtime.errors import UnsupportedModelError

LLAMA_TYPES = ("llama",)
GEMMA3_TYPES = ("gemma3_text",)
SERVED_TYPES = LLAMA_TYPES + GEMMA3_TYPES
# Gemma-3's layer kinds (``layer_types``), which also name its rotary parameters.
SLIDING, FULL = "sliding_attention", "full_attention"
QK_NORM_MODULES = ("self_attn.q_norm", "self_attn.k_norm")

# A layer kind's rotary frequencies ``(head_dim / 2,)`` float32 and scaling.
Rotary = tuple[np.ndarray, float]


@dataclass(frozen=True)
class BlockForm:
    """What a block computes beyond its sizes. The defaults are Llama's block; Gemma-3's differs
    in every field (``gemma3_form``)."""

    # Norms of the attention's and the MLP's outputs too, before each residual add: a block's
    # norms are (input, post-attention, pre-MLP, post-MLP) instead of (input, pre-MLP).
    sandwich_norms: bool = False
    qk_norm: bool = False  # an RMSNorm over each head's query and key, before rotary
    gelu: bool = False  # the MLP's gate through tanh-approximated GELU, else SiLU
    attention_scale: float = 0.0  # multiplies q·k; 0: 1/sqrt(head_dim)
    # Per layer: attend to the last ``window`` positions only (0: all). Empty: every layer all.
    windows: tuple[int, ...] = ()
    # The rotary frequencies and scaling of the windowed layers, where they differ from the
    # others' (Gemma-3: base 10,000 local, 1,000,000 global); None: every layer the same.
    local_inv_freq: np.ndarray | None = None
    local_rope_scaling: float = 1.0
    # Added to every stored norm weight: Gemma's RMSNorm multiplies by ``1 + weight``.
    norm_offset: float = 0.0

    @property
    def norm_modules(self) -> tuple[str, ...]:
        """A block's norm modules, in the order of the step's ``norms[layer]``."""
        if self.sandwich_norms:
            return (
                "input_layernorm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
            )
        return ("input_layernorm", "post_attention_layernorm")


LLAMA_BLOCK = BlockForm()


def embedding_scale(config: Mapping[str, Any]) -> float:
    """What the model multiplies its embedding rows by: Gemma-3's sqrt(hidden) (transformers'
    ``embed_scale``, applied in the embedding module's forward), else 1. A compact embedding
    records its own scale; a float one is stored unscaled."""
    if config.get("model_type") in GEMMA3_TYPES:
        return float(config["hidden_size"]) ** 0.5
    return 1.0


def gemma3_form(
    config: Mapping[str, Any], n_layers: int, rotary: Callable[[str], Rotary]
) -> tuple[BlockForm, Rotary]:
    """Gemma-3's block from its config fields, and the rotary frequencies and scaling of its
    full-attention layers (of its sliding ones where it has no others); ``rotary(kind)`` gives a
    layer kind's. ``UnsupportedModelError`` for a variant the step does not run."""
    activation = config.get("hidden_activation")
    if activation != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"MLP activation {activation!r}; the step has tanh-GELU")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(name) is not None:
            raise UnsupportedModelError(f"{name} = {config[name]}: not served")
    if config.get("use_bidirectional_attention"):
        raise UnsupportedModelError("bidirectional attention: not served")
    # Read, never assumed: transformers' own default is a pattern of sliding and full layers.
    kinds = list(config.get("layer_types") or ())
    if len(kinds) != n_layers or not set(kinds) <= {SLIDING, FULL}:
        raise UnsupportedModelError(
            f"layer types {sorted(set(kinds))} for {n_layers} layers (expected {SLIDING!r} or "
            f"{FULL!r} for each)"
        )
    window = int(config.get("sliding_window") or 0)
    if SLIDING in kinds and window < 1:
        raise UnsupportedModelError(f"sliding layers with a window of {window}")
    # Full-attention layers take the stack's main rotary table, sliding ones their own where
    # both kinds exist (with one kind, that kind's is the only table).
    main = rotary(FULL if FULL in kinds else SLIDING)
    local_inv_freq, local_scaling = (
        rotary(SLIDING) if {SLIDING, FULL} <= set(kinds) else (None, 1.0)
    )
    form = BlockForm(
        sandwich_norms=True,
        qk_norm=True,
        gelu=True,
        attention_scale=float(config["query_pre_attn_scalar"]) ** -0.5,
        windows=tuple(window if kind == SLIDING else 0 for kind in kinds),
        local_inv_freq=local_inv_freq,
        local_rope_scaling=local_scaling,
        norm_offset=1.0,
    )
    return form, main
