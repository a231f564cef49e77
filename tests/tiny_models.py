"""Tiny models built from configs, for fast tests (no downloads), and what tests of them share."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128  # the tiny models' vocabulary where a test does not need the real tokenizer's
INPUT = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # (batch, seq)


def make_tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 64):
    """A seeded 2-block Llama (tied embeddings) in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


# The tiny Gemma-3's sliding window: short, so that test prompts run past it.
TINY_GEMMA3_WINDOW = 5


def make_tiny_gemma3(vocab_size: int, seed: int = 0, hidden: int = 64, **overrides: object):
    """A seeded 3-block Gemma-3 (tied embeddings) in eval mode, with what sets Gemma-3 apart
    from Llama exercised: two sliding-window layers (window ``TINY_GEMMA3_WINDOW``) with their
    own rotary base and a full-attention one with linear rope scaling, query and key norms, an
    attention scale other than 1/sqrt(head_dim), and norm weights drawn at random (Gemma stores
    ``w - 1``; zeros would hide a missed ``1 +``). ``overrides`` go into the config."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "sliding_window": TINY_GEMMA3_WINDOW,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "query_pre_attn_scalar": 24,
        "max_position_embeddings": 256,
        "initializer_range": 0.1,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
        },
    } | overrides
    model = Gemma3ForCausalLM(Gemma3TextConfig(**settings))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0.0, 0.3)
    model.eval()
    return model


def quantized_tiny_llama(calibration: torch.Tensor | None = None, **config) -> nn.Module:
    """``make_tiny_llama(VOCAB)`` quantized with ``BCQConfig(bits=3, group_size=32,
    method="offset", **config)`` (``config`` may override those three)."""
    from alphatune import BCQConfig, quantize_

    model = make_tiny_llama(VOCAB)
    fields = {"bits": 3, "group_size": 32, "method": "offset"} | config
    quantize_(model, BCQConfig(**fields), calibration=calibration)
    return model


def logits(model: nn.Module, ids: torch.Tensor = INPUT) -> torch.Tensor:
    """``(batch, seq, vocab)`` logits of ``ids``, without autograd."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` in dB (float64 sums)."""
    noise = (signal - approx).double().pow(2).sum()
    return float(10 * torch.log10(signal.double().pow(2).sum() / noise))
