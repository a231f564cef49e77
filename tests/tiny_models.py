"""Tiny models built from configs, for fast tests (no downloads)."""

from __future__ import annotations

import torch


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
