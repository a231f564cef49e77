"""``benchmarks/common.py``'s rendered provenance: a results page says where its rows were
measured, from the rows themselves (a page once named the machine that rendered it), and which
rows record nothing (stale once the code under them changed)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_measured_on_names_each_rows_commit_and_machine_and_the_unrecorded_rows(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from common import measured_on

    env = {"commit": "0123456789abcdef", "dirty": False, "processor": "Some CPU", "threads": 2,
           "torch": "2.13.0+cpu"}  # fmt: skip
    records = [
        {"environment": {**env, "date": "2026-12-01T10:00:00+00:00"}},
        {"environment": {**env, "date": "2026-12-03T10:00:00+00:00"}},
        {
            "environment": {
                **env,
                "commit": "fedcba9876543210",
                "dirty": True,
                "threads": 1,
                "date": "2026-12-02T10:00:00+00:00",
            }
        },
        {"perplexity": 1.0},
    ]
    text = measured_on(records)
    assert "2 rows at commit `0123456` on Some CPU (2 threads, torch 2.13.0+cpu), " in text
    assert "2026-12-01 to 2026-12-03" in text
    assert "1 row at commit `fedcba9-dirty` on Some CPU (1 thread," in text
    assert "1 row recording no commit, machine or date" in text and "stale" in text
    assert measured_on([]) == "No measurements yet."
    sys.modules.pop("common", None)
