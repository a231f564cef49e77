from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from alphatune.evaluate import perplexity

VOCAB = 50


class UniformLM(nn.Module):
    """Every token equally likely: perplexity is exactly the vocabulary size."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.seen.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB) + self.anchor)


class OracleLM(nn.Module):
    """Knows the next token of the stream ``0, 1, 2, ...`` (mod vocab): perplexity ~ 1."""

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.full((*input_ids.shape, VOCAB), -1e4)
        logits.scatter_(-1, ((input_ids + 1) % VOCAB).unsqueeze(-1), 0.0)
        return SimpleNamespace(logits=logits)


def test_uniform_model_gives_vocab_size() -> None:
    tokens = torch.randint(0, VOCAB, (103,))
    assert perplexity(UniformLM(), tokens, context=10, progress=False) == pytest.approx(VOCAB)


def test_windows_non_overlapping_tail_dropped_batched() -> None:
    model = UniformLM()
    perplexity(model, torch.zeros(103, dtype=torch.long), context=10, batch_size=4, progress=False)
    assert model.seen == [(4, 10), (4, 10), (2, 10)]


def test_oracle_model_gives_one() -> None:
    tokens = torch.arange(64) % VOCAB
    assert perplexity(OracleLM(), tokens, context=16, progress=False) == pytest.approx(1.0)


def test_matches_hugging_face_loss() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    tokens = torch.randint(0, VOCAB, (70,))
    windows = tokens[:64].view(4, 16)
    with torch.no_grad():
        expected = math.exp(model(input_ids=windows, labels=windows).loss.item())
    ppl = perplexity(model, tokens, context=16, batch_size=3, progress=True)
    assert ppl == pytest.approx(expected, rel=1e-5)


def test_a_prefix_conditions_every_window_and_is_not_scored() -> None:
    """With the BOS as prefix, each forward sees it first; the stream tokens scored are the
    same as without it (all but each window's first)."""
    model = UniformLM()
    tokens = torch.arange(40) % VOCAB
    assert perplexity(model, tokens, context=10, prefix=[7], progress=False) == pytest.approx(VOCAB)
    assert model.seen == [(4, 10)]  # 4 windows of 9 stream tokens after the prefix

    class FirstIsBos(OracleLM):
        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            assert (input_ids[:, 0] == 49).all()
            return super().forward(input_ids)

    assert perplexity(FirstIsBos(), tokens, context=16, prefix=[49], progress=False) == (
        pytest.approx(1.0)
    )
    with pytest.raises(ValueError, match="context must be >= 3"):
        perplexity(model, tokens, context=2, prefix=[7], progress=False)


def test_restores_training_mode() -> None:
    model = UniformLM().train()
    perplexity(model, torch.zeros(20, dtype=torch.long), context=10, progress=False)
    assert model.training


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no full window"):
        perplexity(UniformLM(), torch.zeros(5, dtype=torch.long), context=10, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(UniformLM(), torch.zeros(2, 10, dtype=torch.long), context=10, progress=False)
