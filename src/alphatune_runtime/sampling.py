"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alphatune_runtime.errors import ConfigError


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
        if self.seed < 0:
            raise ConfigError(
                f"seed must be >= 0 (numpy's generators take no negative seed), got {self.seed}"
            )

    def generators(self, prompt_indices: list[int]) -> list[np.random.Generator] | None:
        """One seeded generator per row (None when greedy)."""
        if not self.do_sample:
            return None
        return [np.random.default_rng(self.seed + index) for index in prompt_indices]


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (-inf entries get probability 0)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


def filter_logits(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Logits ``(N, V)`` float32 after temperature, top-k and top-p; removed tokens are -inf."""
    logits = logits.astype(np.float32) / np.float32(sampling.temperature)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = np.partition(logits, -sampling.top_k, axis=-1)[:, -sampling.top_k, None]  # (N, 1)
        logits = np.where(logits < kth, np.float32(-np.inf), logits)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-logits, axis=-1, kind="stable")
        ordered = np.take_along_axis(logits, order, axis=-1)
        probabilities = _softmax(ordered)
        # Drop a token when the more likely ones already reach top_p: the first is always kept.
        drop = probabilities.cumsum(axis=-1) - probabilities >= sampling.top_p
        ordered = np.where(drop, np.float32(-np.inf), ordered)
        np.put_along_axis(logits, order, ordered, axis=-1)
    return logits


def choose_tokens(
    logits: np.ndarray, sampling: Sampling, generators: list[np.random.Generator] | None
) -> np.ndarray:
    """The next token of each row, ``(N,)`` int64; ``generators``: one per row when sampling."""
    if not sampling.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    assert generators is not None and len(generators) == logits.shape[0]
    probabilities = _softmax(filter_logits(logits, sampling))
    return np.array(
        [_draw(row, generator) for row, generator in zip(probabilities, generators, strict=True)],
        np.int64,
    )


def _draw(probabilities: np.ndarray, generator: np.random.Generator) -> int:
    """One token drawn from ``probabilities`` ``(V,)`` (summing to ~1); never one of mass 0."""
    cumulative = probabilities.cumsum()
    index = int(np.searchsorted(cumulative, generator.random() * cumulative[-1], side="right"))
    return min(index, int(np.flatnonzero(probabilities)[-1]))  # float rounding at the very top
