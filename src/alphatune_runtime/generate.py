"""The generate loop: prefill every prompt, then one native step per new token for the batch.

Each prompt has its own cache row and positions (no padding): prefill first offers the prompts
to the decoder's own whole-prompt path (``prefill_prompts``: the engine's dense GEMMs when the
prompts hold enough tokens), else sends their tokens in chunks of up to ``PREFILL_CHUNK`` (rows
mixed in a chunk); decode sends one token per unfinished row. Per token the Python here costs an
embedding lookup, one numba call for all the blocks, the head, the choice of the next token and
(with stop strings) one detokenization of the rows' new tokens. The loop runs on any ``Decoder``
(numpy in and out): ``alphatune.engine.Engine`` (a transformers model's embedding and head
modules) or ``alphatune_runtime.model.Model`` (a saved base, no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from alphatune_runtime.cache import KVCache
from alphatune_runtime.errors import ConfigError
from alphatune_runtime.sampling import Sampling, choose_tokens
from alphatune_runtime.stack import BlockStack

# Prompt tokens per native call in prefill: the LUT kernel's cost grows with the tokens and
# beats dequantize + GEMM up to ~64 (kernels.LUT_MAX_TOKENS).
PREFILL_CHUNK = 64


class Decoder(Protocol):
    """A model the loop runs: a block stack with its embedding and head, on numpy arrays."""

    stack: BlockStack

    def threads(self) -> int:
        """Threads a native call may use, read once per request."""
        ...

    def forward(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        positions: np.ndarray,
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int | None = None,
    ) -> np.ndarray:
        """Final-normed hidden states ``(N, H)`` float32 of tokens ``ids (N,)`` int64 (see
        ``BlockStack.run``)."""
        ...

    def prefill_prompts(
        self,
        prompts: Sequence[np.ndarray],
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int,
    ) -> np.ndarray | None:
        """The final-normed hidden states ``(P, H)`` of whole prompts' last tokens (prompt p
        at positions ``0..len-1`` of cache row p, adapter ``sets[p]``) by a path faster than
        chunks of ``forward``, or None where the decoder has none for these prompts."""
        ...

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """``(N, V)`` float32 logits of hidden states ``(N, H)``."""
        ...


@dataclass(frozen=True)
class Finished:
    """One row's result: its new token ids, and why it stopped."""

    tokens: list[int]
    reason: str  # "eos", "stop" (a stop condition on the text) or "length"


def generate_ids(
    engine: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    sampling: Sampling | None = None,
    prompt_indices: Sequence[int] | None = None,
    adapter_sets: Sequence[int] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    stop: Callable[[str], bool] | None = None,
) -> list[Finished]:
    """Generate up to ``max_new_tokens`` tokens after each prompt (token id lists).

    Args:
        engine: the converted model (a ``Decoder``).
        prompts: one non-empty list of token ids per row (any lengths: no padding is used).
        max_new_tokens: most new tokens per row.
        eos_ids: tokens that end a row (kept out of its result).
        sampling: greedy when None.
        prompt_indices: the prompts' indices in the caller's list, for per-prompt seeds.
        adapter_sets: the adapter scale set of each row (``Engine.build(use_bank=True)``).
        decode: ids -> text, needed with ``stop``.
        stop: called with a row's decoded new text after every token; True ends the row
            (stop strings). The token that completed the condition is kept.

    Returns:
        One ``Finished`` per prompt, in order.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if stop is not None and decode is None:
        raise ConfigError("a stop condition needs decode (ids -> text)")
    sampling = sampling or Sampling()
    n_rows = len(prompts)
    indices = list(range(n_rows)) if prompt_indices is None else list(prompt_indices)
    generators = sampling.generators(indices)
    sets = (
        np.zeros(n_rows, np.int64) if adapter_sets is None else np.asarray(adapter_sets, np.int64)
    )
    max_len = max(len(p) for p in prompts) + max_new_tokens
    cache = engine.stack.new_cache(n_rows, max_len)
    rotary = engine.stack.rotary(max_len)
    eos = set(eos_ids)
    threads = engine.threads()

    last_hidden = _prefill(engine, prompts, sets, cache, rotary, threads)  # (rows, H)
    results: list[list[int]] = [[] for _ in range(n_rows)]
    reasons = ["length"] * n_rows
    active = list(range(n_rows))
    hidden = last_hidden
    positions = np.array([len(p) for p in prompts], np.int64)
    for _ in range(max_new_tokens):
        logits = engine.logits(hidden)  # (active, V)
        chosen = choose_tokens(
            logits, sampling, None if generators is None else [generators[r] for r in active]
        ).tolist()
        still = []
        for row, token in zip(active, chosen, strict=True):
            if token in eos:
                reasons[row] = "eos"
                continue
            results[row].append(token)
            if stop is not None and stop(decode(results[row])):  # type: ignore[misc]
                reasons[row] = "stop"
                continue
            if len(results[row]) < max_new_tokens:
                still.append(row)
        if not still:
            break
        rows = np.array(still, np.int64)
        ids = np.array([results[row][-1] for row in still], np.int64)
        hidden = engine.forward(ids, rows, positions[rows], sets[rows], cache, rotary, threads)
        positions[rows] += 1
        active = still
    return [Finished(tokens, reason) for tokens, reason in zip(results, reasons, strict=True)]


def _prefill(
    engine: Decoder,
    prompts: Sequence[Sequence[int]],
    sets: np.ndarray,
    cache: KVCache,
    rotary: tuple[np.ndarray, np.ndarray],
    threads: int,
) -> np.ndarray:
    """Run every prompt token through the blocks; the last hidden state of each row, (rows, H)."""
    ids = [np.asarray(prompt, np.int64) for prompt in prompts]
    last = engine.prefill_prompts(ids, sets, cache, rotary, threads)
    if last is not None:
        return last
    flat_ids = np.concatenate(ids)
    flat_rows = np.concatenate([np.full(len(p), r, np.int64) for r, p in enumerate(prompts)])
    flat_positions = np.concatenate([np.arange(len(p), dtype=np.int64) for p in prompts])
    last_index = np.cumsum([len(p) for p in prompts]) - 1
    outputs = []
    for start in range(0, len(flat_ids), PREFILL_CHUNK):
        part = slice(start, start + PREFILL_CHUNK)
        rows = flat_rows[part]
        outputs.append(
            engine.forward(
                flat_ids[part], rows, flat_positions[part], sets[rows], cache, rotary, threads
            )
        )
    return np.concatenate(outputs)[last_index]


def prompt_logits(engine: Decoder, prompt: Sequence[int]) -> np.ndarray:
    """Logits ``(len(prompt), V)`` at every position of one prompt (for tests and checks)."""
    cache = engine.stack.new_cache(1, len(prompt))
    rotary = engine.stack.rotary(len(prompt))
    n = len(prompt)
    hidden = engine.forward(
        np.asarray(list(prompt), np.int64), np.zeros(n, np.int64), np.arange(n, dtype=np.int64),
        np.zeros(n, np.int64), cache, rotary,
    )  # fmt: skip
    return engine.logits(hidden)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string (all of it when none occurs)."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]
