"""Scoring generation on a task: prompt-length checks against the context, and BLEU with its
bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from alphatune.data import EvalItem, encode_prompt
from alphatune.errors import DataError
from alphatune.evaluate.generation import generate
from alphatune.evaluate.metrics import bootstrap_interval, corpus_bleu


def context_length(model: nn.Module) -> int | None:
    """Most positions the model handles (``config.max_position_embeddings``); ``None``: unknown."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def check_prompt_lengths(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> None:
    """Raise unless every prompt plus ``max_new_tokens`` fits the model's context window.

    Past its position table a model runs slowly and returns garbage or nothing; saying so up
    front beats minutes of generation.
    """
    context = context_length(model)
    if context is None:
        return
    for index, prompt in enumerate(prompts):
        length = len(encode_prompt(tokenizer, prompt))
        if length + max_new_tokens > context:
            raise DataError(
                f"prompt {index} has {length} tokens; with {max_new_tokens} new tokens that "
                f"exceeds the model's context of {context} tokens. Shorten the prompt or "
                "lower --max-new-tokens"
            )


@dataclass
class TaskScore:
    """BLEU of generated text against the references, its bootstrap 95% interval over items,
    and the generations."""

    bleu: float
    predictions: list[str]
    items: int
    bleu_interval: tuple[float, float] = (float("nan"), float("nan"))


def score_generation(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[EvalItem],
    *,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> TaskScore:
    """Generate for every item and score corpus BLEU against its references."""
    check_prompt_lengths(model, tokenizer, [item.prompt for item in items], max_new_tokens)
    predictions = generate(
        model,
        tokenizer,
        [item.prompt for item in items],
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        batch_size=batch_size,
        progress=progress,
    )
    references = [item.references for item in items]
    bleu = corpus_bleu(predictions, references)
    interval = bootstrap_interval(predictions, references, samples=1000, seed=0)
    return TaskScore(bleu=bleu, predictions=predictions, items=len(items), bleu_interval=interval)
