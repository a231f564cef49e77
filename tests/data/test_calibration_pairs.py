"""Calibration rows from training pairs, and mixed with a text file's rows."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from alphatune.data import (
    Example,
    calibration_batch,
    encode_example,
    mixed_calibration,
    pairs_batch,
)
from alphatune.errors import DataError

E2E = [Example(f"Table: name[R{i}]\nText:", f" R{i} is a pub.") for i in range(6)]
TRIPLES = [Example(f"Triples: T{i} | city | Y\nText:", f" T{i} is in Y.") for i in range(3)]


def _stream(tokenizer: Any, pairs: list[Example]) -> list[int]:
    return [i for pair in pairs for i in encode_example(tokenizer, pair, 512)["input_ids"]]


def test_pairs_alternate_the_sources_each_in_its_seeded_order(tokenizer: Any) -> None:
    rng = random.Random(7)
    e2e, triples = list(E2E), list(TRIPLES)
    rng.shuffle(e2e)
    rng.shuffle(triples)
    # One from each in turn; once the shorter source is used up, the longer one goes on alone.
    order = [e2e[0], triples[0], e2e[1], triples[1], e2e[2], triples[2], *e2e[3:]]
    stream = _stream(tokenizer, order)
    ids = pairs_batch(tokenizer, [E2E, TRIPLES], sequences=3, length=len(stream) // 3, seed=7)
    width = len(stream) // 3
    assert ids.dtype == torch.long
    assert ids.tolist() == [stream[r * width : (r + 1) * width] for r in range(3)]
    other = pairs_batch(tokenizer, [E2E, TRIPLES], sequences=3, length=width, seed=8)
    assert not torch.equal(ids, other)


def test_too_few_pairs_is_a_clear_error(tokenizer: Any) -> None:
    with pytest.raises(DataError, match=r"hold \d+ tokens; 4×512 are needed"):
        pairs_batch(tokenizer, [E2E], sequences=4, length=512)
    with pytest.raises(DataError, match="no training pairs"):
        pairs_batch(tokenizer, [[], []], sequences=1, length=8)


def test_mixed_rows_are_text_first_then_pairs(tokenizer: Any, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    mixed = mixed_calibration(tokenizer, text, [E2E, TRIPLES], sequences=4, length=16)
    assert mixed.shape == (4, 16)
    assert torch.equal(mixed[:2], calibration_batch(tokenizer, text, 2, 16))
    assert torch.equal(mixed[2:], pairs_batch(tokenizer, [E2E, TRIPLES], 2, 16))
    quarter = mixed_calibration(tokenizer, text, [E2E], sequences=4, length=16, pair_share=0.25)
    assert torch.equal(quarter[:3], calibration_batch(tokenizer, text, 3, 16))
    only_pairs = mixed_calibration(tokenizer, text, [E2E], sequences=2, length=16, pair_share=1)
    assert torch.equal(only_pairs, pairs_batch(tokenizer, [E2E], 2, 16))
    with pytest.raises(DataError, match=r"pair_share must be in \(0, 1\]"):
        mixed_calibration(tokenizer, text, [E2E], sequences=4, length=16, pair_share=0)
