"""Helpers the benchmark scripts share: the machine they ran on, timing, and saving results.

The scripts run as ``python benchmarks/<name>.py``, so this module is imported as ``common``.

- ``environment``: what to record next to the numbers (date, CPU, threads, load, versions);
- ``CpuWatch``: whether other processes used the machine during a run (the ``busy`` flag);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from revision import source_revision

from alphatune.experiments.spec import cpu_model

# The default 3-bit SmolLM2 base (compact embedding/head) that bench_decode.py quantizes and saves
# on its first run; the decode studies beside it (bench_decode_limits, bench_table_precision) use it.
DECODE_Q3_BASE = Path.home() / ".cache/alphatune/bench/decode/smollm2-q3-compact"
BUSY_SHARE = 0.1  # other processes used more than a tenth of the CPUs: timings not representative


def environment(packages: Iterable[str] = ("torch",)) -> dict[str, Any]:
    """The machine, software and source (commit, uncommitted changes) a run measured, to save
    beside its results.

    Call it after ``torch.set_num_threads`` (``threads`` is torch's count at the call) and before
    the timed work. ``load_average`` is only a hint: it lags by minutes and counts the run's own
    threads once it has started; ``CpuWatch`` says whether others used the machine during the run.

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
        **source_revision(),
    }
    for name in packages:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return env


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine used since boot, CPU seconds this process and its
    finished children used since they started): their differences over a run give what *others*
    used."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    # Every column of the "cpu" line but idle and iowait is time some process used.
    machine_busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return machine_busy, own.user + own.system + own.children_user + own.children_system


@dataclass(frozen=True)
class OthersCpu:
    """What other processes used of the machine during a run, as ``CpuWatch.stop`` found it."""

    cpu_share: float  # of all CPUs over the run's wall time, 0..1
    cpus: int
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]

    @property
    def busy(self) -> bool:
        return self.cpu_share > BUSY_SHARE

    def record(self) -> dict[str, Any]:
        """The fields a results file's environment carries (``decode_page.py`` reads them)."""
        return {
            "load_average_before": self.load_average_before,
            "load_average_after": self.load_average_after,
            "others_cpu_share": round(self.cpu_share, 3),
            "busy": self.busy,
        }

    def warning(self) -> str:
        return (
            f"WARNING: the machine was busy (other processes used {self.cpu_share:.0%} of its "
            f"{self.cpus} CPUs during the run): the timings are not representative"
        )


class CpuWatch:
    """Measures what other processes use of the machine from now until ``stop()``.

    The one way the benchmarks tell a busy machine: the CPU time every process used
    (``/proc/stat``) minus this process's and its finished children's own. The load average lags
    by minutes (jobs that just ended still count) and counts the run's own threads, so a quiet
    2-thread run on 2 CPUs looked busy by it; it is recorded beside the share, before and after.
    Start it before the timed work (child processes count as the run's own once they have been
    waited for, as ``subprocess.run`` does).
    """

    def __init__(self) -> None:
        self._load_before = os.getloadavg()
        self._cpu_before = cpu_seconds()
        self._wall_before = time.perf_counter()

    def stop(self) -> OthersCpu:
        load_after = os.getloadavg()
        cpus = os.cpu_count() or 1
        cpu_after, wall = cpu_seconds(), time.perf_counter() - self._wall_before
        others = (cpu_after[0] - self._cpu_before[0]) - (cpu_after[1] - self._cpu_before[1])
        return OthersCpu(
            cpu_share=max(0.0, others) / (wall * cpus),
            cpus=cpus,
            load_average_before=self._load_before,
            load_average_after=load_after,
        )


def measured_on(records: list[dict[str, Any]]) -> str:
    """One paragraph for a rendered results page: where, when and at which commit its records
    were measured (each record's ``environment``), never the machine that renders the page; and
    how many records say nothing of it (measured before the sweep recorded it: stale once the
    code under them changed)."""
    groups: dict[tuple, list[str]] = {}
    unrecorded = 0
    for record in records:
        env = record.get("environment")
        if env is None:
            unrecorded += 1
            continue
        commit = str(env.get("commit", "?"))[:7] + ("-dirty" if env.get("dirty") else "")
        where = (commit, env.get("processor", "?"), env.get("threads", "?"), env.get("torch", "?"))
        groups.setdefault(where, []).append(env.get("date", "?"))
    parts = [
        f"{len(dates)} row{'s' * (len(dates) > 1)} at commit `{commit}` on {processor} "
        f"({threads} thread{'s' * (threads != 1)}, torch {torch_version}), "
        f"{min(dates)[:10]}{'' if min(dates)[:10] == max(dates)[:10] else ' to ' + max(dates)[:10]}"
        for (commit, processor, threads, torch_version), dates in groups.items()
    ]
    if unrecorded:
        parts.append(
            f"{unrecorded} row{'s' * (unrecorded > 1)} recording no commit, machine or date "
            "(measured before this sweep kept them): stale wherever the code under them has "
            "changed since, until rerun"
        )
    return "Measured: " + "; ".join(parts) + "." if parts else "No measurements yet."


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


def save_watched_results(
    path: Path,
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    *,
    env: dict[str, Any],
    watch: CpuWatch,
) -> None:
    """``save_results`` at the end of a timed run: stops ``watch``, warns if others used the
    machine meanwhile, and records what others used beside ``env``."""
    others = watch.stop()
    if others.busy:
        print(others.warning())
    save_results(path, args, results, env={**env, **others.record()})
    print(f"saved {path}")


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
