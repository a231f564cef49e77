"""Calibration text that mixes general prose with a task's own training pairs.

The calibrated quantizer fits each layer to the inputs it sees during calibration. WikiText-2
prose never asks the model to copy names from a prompt, and the 3-bit base tuned on WebNLG leaves
out more of the input facts than the 4-bit one (docs/choosing.md). Half WikiText-2, half the
data-to-text tasks' training pairs (prompt, target, end of text) closed two thirds of the 3-bit
base's gap to LoRA on WebNLG (with ``v_proj``/``o_proj``/``down_proj`` at 4 bits; docs/results.md),
so the quantizer can read a user's training pairs too: ``alphatune quantize --calibration-pairs``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from alphatune.data.examples import Example
from alphatune.data.locate import calibration_batch
from alphatune.data.tokenize import encode_example
from alphatune.errors import DataError

# The share of calibration rows cut from the training pairs when a run gives pairs: the share
# measured (bench_task_calibration.py and the WebNLG runs in docs/results.md).
DEFAULT_PAIR_SHARE = 0.5


def _interleaved(sources: Sequence[Sequence[Example]], seed: int) -> Iterator[Example]:
    """Each source in its own seeded order (one generator, the sources shuffled in turn), then
    one pair from each in turn until all are used up."""
    rng = random.Random(seed)
    orders = []
    for source in sources:
        order = list(source)
        rng.shuffle(order)
        orders.append(order)
    for i in range(max((len(o) for o in orders), default=0)):
        for order in orders:
            if i < len(order):
                yield order[i]


def pairs_batch(
    tokenizer: Any,
    sources: Sequence[Sequence[Example]],
    sequences: int,
    length: int,
    seed: int = 0,
) -> Tensor:
    """``(sequences, length)`` token ids: training pairs as the model is tuned on them (prompt,
    target, end of text; :func:`encode_example`, at most ``length`` tokens each) end to end.

    Args:
        sources: one list of pairs per task; their pairs alternate, so no task fills the rows.
        seed: the order each source is read in.
    """
    if not any(sources):
        raise DataError("no training pairs given for calibration")
    needed = sequences * length
    stream: list[int] = []
    for pair in _interleaved(sources, seed):
        stream += encode_example(tokenizer, pair, length)["input_ids"]
        if len(stream) >= needed:
            return torch.tensor(stream[:needed], dtype=torch.long).view(sequences, length)
    raise DataError(
        f"the calibration pairs hold {len(stream)} tokens; {sequences}×{length} are needed "
        "(give more pairs, a smaller pair share or fewer calibration sequences)"
    )


def pair_rows(sequences: int, pair_share: float) -> int:
    """How many of ``sequences`` calibration rows :func:`mixed_calibration` cuts from the pairs."""
    if not 0 < pair_share <= 1:
        raise DataError(f"pair_share must be in (0, 1], got {pair_share}")
    return max(1, round(sequences * pair_share))


def mixed_calibration(
    tokenizer: Any,
    text_path: str | os.PathLike[str],
    sources: Sequence[Sequence[Example]],
    sequences: int,
    length: int,
    pair_share: float = DEFAULT_PAIR_SHARE,
    seed: int = 0,
) -> Tensor:
    """``(sequences, length)`` calibration token ids: the first rows cut from the text file
    (:func:`calibration_batch`), the last :func:`pair_rows` of them from the training pairs
    (:func:`pairs_batch`)."""
    rows = pair_rows(sequences, pair_share)
    pairs = pairs_batch(tokenizer, sources, rows, length, seed)
    if rows == sequences:
        return pairs
    return torch.cat([calibration_batch(tokenizer, text_path, sequences - rows, length), pairs])
