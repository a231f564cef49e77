"""The two shapes every task loader returns: training pairs and evaluation items."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from alphatune.errors import DataError

logger = logging.getLogger(__name__)


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
    """One evaluation input with every reference text written for it."""

    prompt: str
    references: tuple[str, ...]


def check_limit(limit: int | None) -> None:
    """Reject a negative ``limit`` (``None`` means no limit; 0 returns nothing)."""
    if limit is not None and limit < 0:
        raise DataError(f"limit must be None or >= 0, got {limit}")
