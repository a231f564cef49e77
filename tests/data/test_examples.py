"""The seeded evaluation sample."""

from __future__ import annotations

import pytest

from alphatune.data import seeded_sample
from alphatune.errors import DataError


def test_a_seeded_sample_is_fixed_ordered_and_spread() -> None:
    items = list(range(630))
    sample = seeded_sample(items, 48, seed=0)
    assert sample == seeded_sample(items, 48, seed=0)
    assert sample == sorted(sample) and len(set(sample)) == 48
    assert sample != items[:48] and max(sample) > 315  # not the file's first inputs
    assert seeded_sample(items, 48, seed=1) != sample


def test_no_limit_or_a_large_one_keeps_everything() -> None:
    assert seeded_sample("abc", None, seed=0) == ["a", "b", "c"]
    assert seeded_sample("abc", 5, seed=0) == ["a", "b", "c"]
    with pytest.raises(DataError, match="limit must be None or >= 0"):
        seeded_sample("abc", -1, seed=0)
