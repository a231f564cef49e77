"""Turning examples into token ids and batches, and picking a task's loader by name.

The prompt and the target are tokenized separately and concatenated, so the prompt ids seen in
training are exactly the ids :func:`encode_prompt` gives at generation time (tokenizing
``prompt + target`` as one string could merge tokens across the boundary).
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


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, exactly as :func:`encode_example` tokenizes its prompt part."""
    return _ids(tokenizer, prompt)


def encode_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels for one training pair.

    ``input_ids = prompt_ids + target_ids + [eos]``; ``labels`` is the same with every prompt
    position set to -100. Labels are not shifted: the model shifts them, as Hugging Face causal
    LMs do. Too long a pair loses prompt tokens from the left; a target that alone does not fit
    keeps one prompt token and loses its own tail (and the eos).

    Args:
        tokenizer: a Hugging Face tokenizer with an eos token.
        example: the pair to encode.
        max_length: most tokens in the result, >= 2.

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, two lists of the same length <= max_length.
    """
    if max_length < 2:
        raise DataError(
            f"max_length must be >= 2 (one prompt and one target token), got {max_length}"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; set tokenizer.eos_token first")
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    target_ids = _ids(tokenizer, example.target) + [eos_id]
    if len(prompt_ids) + len(target_ids) > max_length:
        target_ids = target_ids[: max_length - 1]
        keep = max_length - len(target_ids)  # >= 1 prompt token
        prompt_ids = prompt_ids[max(0, len(prompt_ids) - keep) :]
        logger.debug("truncated an example to %d tokens", max_length)
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
