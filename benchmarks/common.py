"""Helpers the benchmark scripts share: the machine they ran on, timing, and saving results.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported as ``common``.

- ``environment``: what to record next to the numbers (date, CPU, threads, load, versions);
- ``time_ms``: median wall time of a call, after a warm-up, within a time budget;
- ``save_results``: one JSON file ``{"environment", "args", "results", ...}`` per run, the shape
  ``render_performance.py`` reads;
- ``load_records`` / ``append_record``: the JSONL files of the resumable sweeps
  (``bench_quantization.py``, ``bench_lm_head.py``), one line per finished measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from alphatune.experiments.spec import cpu_model


def environment(packages: Iterable[str] = ("torch",)) -> dict[str, Any]:
    """The machine and software a run measured, to save beside its results.

    Call it after ``torch.set_num_threads`` (``threads`` is torch's count at the call) and before
    the timed work: the load average then says what else was running, not what the run itself did.

    Args:
        packages: distributions whose versions to record, each under its own name; one that is not
            installed is left out. Versions come from the package metadata, so nothing is imported.
    """
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    for name in packages:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return env


def describe_machine() -> str:
    """One line for a rendered results page: CPU model, torch threads, torch version."""
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def time_ms(
    fn: Callable[[], object], repeat: int, budget_s: float | None = None, warmup: bool = True
) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    Args:
        fn: the call to time; its result is discarded.
        repeat: timed calls at most.
        budget_s: seconds after which to stop early, once at least 3 calls are timed; ``None``
            times all ``repeat`` calls.
        warmup: make one untimed call first (first-call costs: numba compiles, allocations).
    """
    if warmup:
        fn()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeat:
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
        if budget_s is not None and len(times) >= 3 and time.perf_counter() - started > budget_s:
            break
    return statistics.median(times) * 1e3


def save_results(
    path: Path,
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    *,
    env: dict[str, Any],
    **extra: Any,
) -> None:
    """Write one run as indented JSON: ``{"environment", "args", "results", **extra}``.

    Args:
        path: the JSON file; its folder is created if missing, the file overwritten.
        args: the parsed command line, saved with paths as strings.
        results: one dict per measurement.
        env: what ``environment`` returned (plus any keys the script adds).
        extra: more top-level keys (a summary, a description of the model).
    """
    payload = {
        "environment": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def load_records(path: Path) -> list[dict[str, Any]]:
    """The measurements a sweep saved in the JSONL file ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(
    records: list[dict[str, Any]],
    entry: dict[str, Any],
    out: Path,
    docs: Path,
    render: Callable[[list[dict[str, Any]]], str],
) -> None:
    """Add a finished measurement to ``records`` and to ``out``, then re-render ``docs``.

    The JSONL line is appended as soon as the measurement is done, so a killed sweep resumes
    where it stopped; the page is rewritten from all records each time, so it is never stale.

    Args:
        records: the sweep's records so far; ``entry`` is appended in place.
        entry: the new measurement.
        out: the JSONL results file.
        docs: the markdown page ``render(records)`` writes.
        render: records -> markdown.
    """
    records.append(entry)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(render(records))
    print(json.dumps(entry), flush=True)
