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
