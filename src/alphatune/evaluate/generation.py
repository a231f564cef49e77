"""Batched text generation from prompts, for scoring a tuned model on a task."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from alphatune.data.tokenize import encode_prompt
from alphatune.errors import ConfigError, DataError
from alphatune.mixed import adapter_bank
from alphatune.models import model_device

logger = logging.getLogger(__name__)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``input_ids`` and ``attention_mask``, int64 (batch, longest)."""
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, longest - len(row) :] = 1
    return input_ids, attention_mask


def _first_line(text: str) -> str:
    """The generated answer: stripped text up to the first line break."""
    return text.strip().split("\n", 1)[0].strip()


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    batch_size: int = 8,
    adapters: Sequence[str | None] | None = None,
    progress: bool = True,
) -> list[str]:
    """Generate one answer per prompt: greedy (``num_beams == 1``) or beam search.

    Prompts are tokenized with :func:`alphatune.data.encode_prompt` (the ids training used),
    sorted by length so each batch wastes little padding, left-padded, and run through
    ``model.generate``. Only the new tokens are decoded; the answer is cut at the first line
    break. The model is put in eval mode for the call and restored afterwards.

    With ``adapters``, each prompt runs with its own task adapter from the bank loaded by
    :func:`alphatune.mixed.load_adapters`, in mixed batches; every answer is the one that prompt
    gets alone with that adapter loaded.

    Args:
        model: a Hugging Face causal LM (anything with ``generate``).
        tokenizer: its tokenizer; needs an eos token (the pad token defaults to it).
        prompts: input texts, each non-empty after tokenization.
        max_new_tokens: most tokens generated per prompt.
        num_beams: 1 for greedy decoding, more for beam search (with early stopping).
        batch_size: prompts per ``generate`` call.
        adapters: one loaded adapter name per prompt (``None``: the base), or ``None`` to use
            the model as it is.
        progress: show a transient rich progress bar.

    Returns:
        One stripped string per prompt, in the order of ``prompts``.
    """
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise DataError(
            "batch_size, num_beams and max_new_tokens must be >= 1, got "
            f"{batch_size}, {num_beams}, {max_new_tokens}"
        )
    if adapters is not None and len(adapters) != len(prompts):
        raise ConfigError(
            f"adapters must name one adapter per prompt: {len(prompts)} prompts, "
            f"{len(adapters)} adapters"
        )
    if not prompts:
        return []
    bank = None
    if adapters is not None:
        bank = adapter_bank(model)
        if bank is None:
            raise ConfigError(
                "adapters= needs adapters loaded side by side: call "
                "alphatune.mixed.load_adapters(model, {name: directory, ...}) first"
            )
        bank.indices(adapters)  # unknown names fail now, not after some batches
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; set tokenizer.eos_token first")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    for index, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"prompt {index} is empty after tokenization; give it some text")
    # Longest first: a batch too large for memory fails at once, not at the end.
    order = sorted(range(len(prompts)), key=lambda index: len(encoded[index]), reverse=True)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": num_beams,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if num_beams > 1:
        options.update(early_stopping=True, no_repeat_ngram_size=0)
    device = model_device(model)
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            Progress(transient=True, disable=not progress) as bar,
        ):
            task = bar.add_task("generating", total=len(prompts))
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in indices], pad_id)
                # Beam search runs num_beams rows per prompt, the beams of a prompt adjacent.
                rows = (
                    nullcontext()
                    if bank is None or adapters is None
                    else bank.rows([adapters[i] for i in indices for _ in range(num_beams)])
                )
                with rows:
                    output = model.generate(  # type: ignore[operator]
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        **options,
                    )
                new_tokens = output[:, input_ids.shape[1] :]  # (batch, <= max_new_tokens)
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for index, text in zip(indices, texts, strict=True):
                    answers[index] = _first_line(text)
                bar.advance(task, len(indices))
    finally:
        model.train(was_training)
    logger.debug("generated %d answers", len(answers))
    return answers
