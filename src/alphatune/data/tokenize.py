"""Turning examples into token ids and batches, and picking a task's loader by name.

The prompt and the target are tokenized separately and concatenated, so the prompt ids seen in
training are exactly the ids :func:`encode_prompt` gives at generation time (tokenizing
``prompt + target`` as one string could merge tokens across the boundary). A prompt starts with
the BOS token when the tokenizer itself starts texts with one (Gemma: without it the model
degenerates); SmolLM2's tokenizer adds none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from alphatune.data.e2e import load_e2e_eval, load_e2e_train
from alphatune.data.examples import EvalItem, Example
from alphatune.data.triples import load_triples_eval, load_triples_train
from alphatune.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the Hugging Face causal-LM loss skips


def _ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def start_ids(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer starts every text with BOS (Gemma, Llama 2), else ``[]``.

    Asked of the tokenizer (one character with and without its special tokens) rather than read
    from a flag, whose name and meaning differ between tokenizer classes; an EOS that some
    tokenizers append is never taken (a prompt must not end).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    marked = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    return [bos] if marked[:1] == [bos] and _ids(tokenizer, "a")[:1] != [bos] else []


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, exactly as :func:`encode_example` tokenizes its prompt part: BOS
    first when the tokenizer adds one (:func:`start_ids`), no EOS."""
    return start_ids(tokenizer) + _ids(tokenizer, prompt)


def encode_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels for one training pair.

    ``input_ids = prompt_ids + target_ids + [eos]`` (``prompt_ids`` from :func:`encode_prompt`,
    with the tokenizer's BOS if it adds one); ``labels`` is the same with every prompt position
    set to -100. Labels are not shifted: the model shifts them, as Hugging Face causal LMs do. Too
    long a pair loses prompt tokens from the left (after the BOS, which stays); a target that
    alone does not fit keeps one prompt token (besides the BOS) and loses its own tail (and the
    eos).

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        example: the pair to encode.
        max_length: most tokens in the result, >= 2 (>= 3 with a BOS).

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, two lists of the same length <= max_length.
    """
    start = start_ids(tokenizer)
    if max_length < len(start) + 2:
        raise DataError(
            f"max_length must be >= {len(start) + 2} ({'a BOS, ' if start else ''}one prompt and "
            f"one target token), got {max_length}"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; set tokenizer.eos_token first")
    body = _ids(tokenizer, example.prompt)
    target_ids = _ids(tokenizer, example.target) + [eos_id]
    if len(start) + len(body) + len(target_ids) > max_length:
        room = max_length - len(start)  # >= 2
        target_ids = target_ids[: room - 1]
        keep = room - len(target_ids)  # >= 1 prompt token
        body = body[max(0, len(body) - keep) :]
        logger.debug("truncated an example to %d tokens", max_length)
    prompt_ids = start + body
    return {
        "input_ids": prompt_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad encoded examples to the longest one.

    Args:
        batch: outputs of :func:`encode_example`.
        pad_id: token id used for padding ``input_ids`` (padded labels are -100).

    Returns:
        ``input_ids`` and ``labels`` (int64, (batch, longest)) and ``attention_mask``
        (int64, (batch, longest), 1 on real tokens).
    """
    if not batch:
        raise DataError("cannot collate an empty batch")
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, item in enumerate(batch):
        length = len(item["input_ids"])
        if len(item["labels"]) != length:
            raise DataError(
                f"batch item {row}: {length} input_ids but {len(item['labels'])} labels"
            )
        input_ids[row, :length] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


Loader = Callable[[str | os.PathLike[str], int | None], list[Any]]

# task name -> (training loader, evaluation loader); "webnlg" is an alias of "triples".
TASKS: dict[str, tuple[Loader, Loader]] = {
    "e2e": (load_e2e_train, load_e2e_eval),
    "triples": (load_triples_train, load_triples_eval),
    "webnlg": (load_triples_train, load_triples_eval),
}


def load_task(
    task: str,
    path: str | os.PathLike[str],
    split_role: Literal["train", "eval"],
    limit: int | None = None,
) -> list[Example] | list[EvalItem]:
    """Load a task's file as training examples or as evaluation items.

    Args:
        task: ``"e2e"`` (CSV) or ``"triples"`` (WebNLG-style JSONL; ``"webnlg"`` also works).
        path: the data file.
        split_role: ``"train"`` gives ``list[Example]``, ``"eval"`` gives ``list[EvalItem]``.
        limit: at most this many examples / items; ``None`` for all.
    """
    loaders = TASKS.get(task.lower())
    if loaders is None:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    if split_role == "train":
        return loaders[0](path, limit)
    if split_role == "eval":
        return loaders[1](path, limit)
    raise DataError(f"split_role must be 'train' or 'eval', got {split_role!r}")
