"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alphatune.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``do_sample=False`` (the default) is greedy (argmax).

    With ``do_sample``: logits / ``temperature``, then only the ``top_k`` most likely tokens
    (None: all), then the smallest set of most likely tokens whose probability reaches ``top_p``
    (None or 1: all; the most likely token is always kept), then a draw. ``seed`` seeds one
    generator per prompt (``seed + prompt index``), so a prompt's sample does not depend on the
    batch it runs in.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(
                f"temperature must be > 0, got {self.temperature}; use greedy instead"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (or None), got {self.top_p}")

    def generators(self, prompt_indices: list[int]) -> list[torch.Generator] | None:
        """One seeded generator per row (None when greedy)."""
        if not self.do_sample:
            return None
        return [torch.Generator().manual_seed(self.seed + index) for index in prompt_indices]


def filter_logits(logits: Tensor, sampling: Sampling) -> Tensor:
    """Logits ``(N, V)`` float32 after temperature, top-k and top-p; removed tokens are -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the more likely ones already reach top_p: the first is always kept.
        drop = cumulative - ordered.softmax(dim=-1) >= sampling.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def choose_tokens(
    logits: Tensor, sampling: Sampling, generators: list[torch.Generator] | None
) -> Tensor:
    """The next token of each row, ``(N,)`` int64; ``generators``: one per row when sampling."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    assert generators is not None and len(generators) == logits.shape[0]
    probabilities = filter_logits(logits.float(), sampling).softmax(dim=-1)
    return torch.cat(
        [
            torch.multinomial(probabilities[row], 1, generator=generator)
            for row, generator in enumerate(generators)
        ]
    )
