"""What the engine reads from a Hugging Face model: its shape, and why a model is not served.

``describe(model)`` returns a ``ModelSpec`` (its ``Shape``: sizes, norm epsilon, rotary
frequencies, the block's form; and the modules holding its blocks) or raises
``UnsupportedModelError`` saying what does not fit; the caller falls back to transformers
``generate`` and logs that reason. ``token_io(model)`` maps the embedding and the LM head,
whatever their type, to two plain callables.

Two block forms are served (``alphatune_runtime.forms``): Llama's (pre-norm RMSNorm,
rotary attention with grouped KV heads, SiLU-gated MLP) and Gemma-3's (the same with norms of
each head's query and key, norms of the attention's and the MLP's outputs, a tanh-GELU gate,
RMSNorm weights stored as ``w - 1``, its own attention scale, sliding-window layers with their
own rotary frequencies; its embedding's scaling is the embedding module's). Logit soft-capping,
bidirectional attention and other model types are not served.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from alphatune.errors import UnsupportedModelError
from alphatune.layers import BCQLinear
from alphatune_runtime.forms import GEMMA3_TYPES, LLAMA_BLOCK, SERVED_TYPES, gemma3_form
from alphatune_runtime.native import PROJECTIONS
from alphatune_runtime.stack import Shape

# Rotary variants whose frequencies do not depend on the sequence length (``dynamic`` does).
STATIC_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelSpec:
    """A served model as the engine sees it: its shape, and the modules holding its blocks."""

    shape: Shape
    blocks: tuple[nn.Module, ...]
    final_norm: nn.Module


def describe(model: nn.Module) -> ModelSpec:
    """The engine's view of ``model``; ``UnsupportedModelError`` says why it cannot serve it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SERVED_TYPES:
        raise UnsupportedModelError(
            f"the decode engine serves the Llama family and Gemma-3 "
            f"({', '.join(SERVED_TYPES)}), this model is {model_type!r}"
        )
    inner = getattr(model, "model", None)
    blocks = tuple(getattr(inner, "layers", ()))
    rotary = getattr(inner, "rotary_emb", None)
    if not blocks or rotary is None or not hasattr(inner, "norm"):
        raise UnsupportedModelError("the model has no model.layers / rotary_emb / norm")
    hidden, n_heads = config.hidden_size, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or hidden // n_heads
    if n_heads % n_kv or head_dim % 2:
        raise UnsupportedModelError(f"{n_heads} heads over {n_kv} KV heads of size {head_dim}")
    if model_type in GEMMA3_TYPES:
        form, (inv_freq, rope_scaling) = gemma3_form(
            config.to_dict(), len(blocks), lambda kind: _rotary_of(rotary, kind)
        )
    else:
        if getattr(config, "hidden_act", None) != "silu":
            raise UnsupportedModelError(
                f"MLP activation {config.hidden_act!r}, the engine has silu"
            )
        form = LLAMA_BLOCK
        inv_freq, rope_scaling = _rotary_of(rotary, None)
    shape = Shape(
        n_layers=len(blocks),
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        eps=float(config.rms_norm_eps),
        inv_freq=inv_freq,
        rope_scaling=rope_scaling,
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 0),
        block=form,
    )
    for index, block in enumerate(blocks):
        _check_block(index, block, shape.attention_scale())
    return ModelSpec(shape=shape, blocks=blocks, final_norm=inner.norm)


def _rotary_of(rotary: nn.Module, kind: str | None) -> tuple[np.ndarray, float]:
    """The frequencies and attention scaling of ``rotary`` (Gemma-3: of one layer kind)."""
    prefix = "" if kind is None else f"{kind}_"
    types = getattr(rotary, "rope_type", "default")
    rope_type = types.get(kind, "default") if isinstance(types, dict) else types
    if rope_type not in STATIC_ROPE:
        raise UnsupportedModelError(
            f"rotary type {rope_type!r} (the engine has {', '.join(STATIC_ROPE)})"
        )
    inv_freq = getattr(rotary, f"{prefix}inv_freq", None)
    if inv_freq is None:  # e.g. Gemma-3 in transformers 4.x, whose local rotary is a module
        raise UnsupportedModelError(
            f"the rotary embedding has no {prefix}inv_freq (the engine reads transformers 5's)"
        )
    scaling = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
    return inv_freq.detach().float().cpu().numpy().copy(), scaling


def _check_block(index: int, block: nn.Module, scale: float) -> None:
    for name in PROJECTIONS:
        module = block.get_submodule(name)
        if not isinstance(module, BCQLinear):
            raise UnsupportedModelError(
                f"model.layers.{index}.{name} is {type(module).__name__}, not BCQLinear: the "
                "engine decodes quantized blocks only (quantize the model or load a base)"
            )
        if module.packed_codes.device.type != "cpu":
            raise UnsupportedModelError("the engine runs on CPU; the model is on another device")
    scaling = getattr(block.self_attn, "scaling", scale)
    if abs(scaling - scale) > 1e-6 * scale:
        raise UnsupportedModelError(f"attention scaling {scaling}, expected {scale}")


@dataclass(frozen=True)
class TokenIO:
    """The embedding and the LM head as callables: ids (N,) -> (N, H), hidden (N, H) -> (N, V)."""

    embed: Callable[[Tensor], Tensor]
    head: Callable[[Tensor], Tensor]


def token_io(model: nn.Module, hidden: int) -> TokenIO:
    """Map the model's embedding and LM head modules, whatever their type (``nn.Embedding`` or a
    compact embedding, ``nn.Linear`` fp32 / bf16, a ``BCQLinear`` head, ...), to float32 callables.

    Both run through the modules' own forwards, so a compact form keeps its fast path and this
    engine needs no knowledge of it. A module that is missing, or whose output has the wrong width
    on a one-token probe, raises ``UnsupportedModelError`` (the caller falls back).
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embedding is None or head is None:
        raise UnsupportedModelError("the model has no input embedding or no LM head module")

    def embed(ids: Tensor) -> Tensor:
        return embedding(ids).detach().float()

    def project(states: Tensor) -> Tensor:
        return head(states).detach().float()

    with torch.inference_mode():
        probe = embed(torch.zeros(1, dtype=torch.long))
        logits = project(probe)
    if probe.shape != (1, hidden) or logits.dim() != 2 or logits.shape[0] != 1:
        raise UnsupportedModelError(
            f"embedding gives {tuple(probe.shape)} and head {tuple(logits.shape)} for one token; "
            f"the engine expects (1, {hidden}) and (1, vocab)"
        )
    return TokenIO(embed=embed, head=project)
