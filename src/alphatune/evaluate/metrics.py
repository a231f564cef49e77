"""Scores of generated text against references."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sacrebleu

from alphatune.errors import DataError

logger = logging.getLogger(__name__)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, 4-grams) with many references per item.

    Items may have different numbers of references; the shorter ones are padded with ``None``,
    which sacrebleu skips.

    Args:
        hypotheses: one generated text per item, length n.
        references: the references of each item, length n, each with at least one string.

    Returns:
        BLEU on sacrebleu's 0-100 scale.
    """
    if len(hypotheses) != len(references):
        raise DataError(
            f"got {len(hypotheses)} hypotheses but {len(references)} reference sets; "
            "give one reference set per hypothesis"
        )
    if not hypotheses:
        raise DataError("cannot score an empty corpus")
    for index, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(
                f"references[{index}] is a string; wrap it as a tuple of references: (ref,)"
            )
        if not refs:
            raise DataError(f"references[{index}] is empty; every item needs a reference")
    most = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference slot, each as long as the hypotheses.
    streams: list[list[str | None]] = [
        [refs[slot] if slot < len(refs) else None for refs in references] for slot in range(most)
    ]
    score = sacrebleu.corpus_bleu(list(hypotheses), streams)  # type: ignore[arg-type]
    logger.debug("%s", score)
    return float(score.score)
