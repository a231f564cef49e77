"""The two shapes every task loader returns: training pairs and evaluation items."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from alphatune.errors import DataError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One training pair: the model reads ``prompt`` and learns to continue with ``target``.

    ``target`` starts with a space (``" The Vaults is a pub ..."``) so that it tokenizes as the
    continuation of the prompt does at generation time.
    """

    prompt: str
    target: str


@dataclass(frozen=True)
class EvalItem:
    """One evaluation input with every reference text written for it.

    ``entities``: the names a data-to-text input asks the output to mention (a WebNLG triple
    set's subjects and objects, as the prompt spells them); empty where the task has none. They
    score omissions (``alphatune.evaluate.missing_entities``).
    """

    prompt: str
    references: tuple[str, ...]
    entities: tuple[str, ...] = ()


def check_limit(limit: int | None) -> None:
    """Reject a negative ``limit`` (``None`` means no limit; 0 returns nothing)."""
    if limit is not None and limit < 0:
        raise DataError(f"limit must be None or >= 0, got {limit}")


def seeded_sample(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """``limit`` items drawn at random with ``seed``, kept in their original order (all of them
    when ``limit`` is ``None`` or not smaller): a fixed sample that does not favour the start of
    a file."""
    check_limit(limit)
    if limit is None or limit >= len(items):
        return list(items)
    kept = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in kept]
