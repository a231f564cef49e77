"""What one run of the paper comparison is (``RunSpec``), where its files go, and what it records.

A run is one (task, method, bits, seed, learning rate, split) with the shared training budget. Its
result is one JSON file, ``<results>/<task>/<run id>.json``, written atomically at the end: a run
whose file exists is done and is skipped; a killed run resumes from its training checkpoint in the
work directory (``<work>/<task>/<training id>/``: the run id without the split, so the test run of
the learning rate the dev search chose continues from the dev run's final checkpoint instead of
training again), which also holds what later runs reuse (the weights a fine-tuned model hands to
its post-training-quantization runs).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alphatune.errors import ConfigError
from alphatune.files import write_file
from alphatune.models import DEFAULT_MODEL

RESULT_FORMAT = 1
# The libraries whose versions every result records.
RECORDED_PACKAGES = (
    "alphatune",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "sacrebleu",
    "nltk",
    "pycocoevalcap",
)
SPLITS = ("dev", "test")


@dataclass(frozen=True)
class Budget:
    """The training and decoding budget every method of a task gets (the report states it)."""

    steps: int = 300
    batch_size: int = 8
    max_length: int = 128
    num_beams: int = 1
    max_new_tokens: int = 64
    eval_limit: int | None = None  # items scored (a seeded sample); None: the whole split
    # Names a budget other than its task's (``steps300``: the grid's runs at 3x the steps), so
    # such a run has files and a table row of its own; empty for the task's own budget.
    tag: str = ""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "num_beams", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"budget {name} must be a positive integer, got {value!r}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"budget eval_limit must be None or >= 1, got {self.eval_limit!r}")
        if not isinstance(self.tag, str) or not re.fullmatch(r"[a-z0-9]*", self.tag):
            raise ConfigError(
                f"budget tag must be lower-case letters and digits (it names files), got "
                f"{self.tag!r}"
            )


@dataclass(frozen=True)
class RunSpec:
    """One run of the comparison.

    Args:
        task: a key of ``alphatune.experiments.tasks.TASKS`` (``e2e``, ``webnlg``,
            ``webnlg-heldout``, ``sst2``).
        method: a key of ``alphatune.experiments.methods.METHODS``.
        bits: bits of the quantized weights, ``None`` for a full-precision method.
        seed: training seed (data order and any random initialisation).
        learning_rate: peak learning rate.
        split: ``dev`` (learning-rate searches, recipe candidates) or ``test`` (the reported
            numbers); a task may have only some (``Task.splits``).
        options: method options as sorted ``(name, value)`` pairs (hashable; see ``option``).
        budget: the shared training and decoding budget.
        model: the model every method starts from (a name ``load_model`` takes, or a directory).
    """

    task: str
    method: str
    bits: int | None
    seed: int
    learning_rate: float
    split: str = "test"
    options: tuple[tuple[str, Any], ...] = ()
    budget: Budget = field(default_factory=Budget)
    model: str = DEFAULT_MODEL

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not self.learning_rate > 0 or self.learning_rate == float("inf"):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        object.__setattr__(self, "options", tuple(sorted(dict(self.options).items())))
        for name, value in self.options:
            if not isinstance(value, str | int | float | bool) or "/" in str(value):
                raise ConfigError(
                    f"method option {name}={value!r}: options are plain words or numbers "
                    "(they name the run's files)"
                )

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def variant(self) -> str:
        """Method and options, e.g. ``alphatuning[granularity=row]``, and a budget's tag, e.g.
        ``alphatuning (steps300)``: one row of a table."""
        budget = f" ({self.budget.tag})" if self.budget.tag else ""
        if not self.options:
            return self.method + budget
        return f"{self.method}[{','.join(f'{k}={v}' for k, v in self.options)}]{budget}"

    @property
    def training_id(self) -> str:
        """The run id without the split: a dev run and a test run of the same method, rate and
        seed train the same model, so the test run reuses the dev run's training."""
        return self.run_id.rsplit("-", 1)[0]

    @property
    def run_id(self) -> str:
        bits = "fp" if self.bits is None else f"q{self.bits}"
        opts = "".join(f"-{k}={v}" for k, v in self.options)
        model = "" if self.model == DEFAULT_MODEL else f"-{Path(self.model).name}"
        budget = f"-{self.budget.tag}" if self.budget.tag else ""
        return (
            f"{self.method}{opts}{model}-{bits}-lr{self.learning_rate:g}-s{self.seed}{budget}"
            f"-{self.split}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        data = dict(data)
        budget = Budget(**data.pop("budget", {}))
        options = tuple(dict(data.pop("options", {})).items())
        return cls(**data, options=options, budget=budget)


def result_path(results_dir: Path, spec: RunSpec) -> Path:
    return results_dir / spec.task / f"{spec.run_id}.json"


def work_path(work_dir: Path, spec: RunSpec) -> Path:
    """Checkpoints and handed-off weights: one folder per training, shared by dev and test."""
    return work_dir / spec.task / spec.training_id


def commit() -> str:
    """The git commit of the code that ran (``-dirty`` when the tree had changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


# The vector extensions that change which float kernels BLAS and numba run: the same code gives
# slightly different numbers on CPUs with and without them (a 3-bit base quantized on an AVX2 and
# on an AVX-512 EPYC differed by 1.7% in WikiText-2 perplexity), and "AMD EPYC" names both.
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")


def vector_extensions() -> list[str]:
    """Which of ``VECTOR_EXTENSIONS`` this CPU reports (``/proc/cpuinfo``; empty elsewhere)."""
    flags = set((_cpuinfo_field("flags") or _cpuinfo_field("Features") or "").split())
    return [name for name in VECTOR_EXTENSIONS if name in flags]


def environment() -> dict[str, Any]:
    """Commit, library versions, machine and date, to save beside every result."""
    env: dict[str, Any] = {
        "commit": commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "vector_extensions": vector_extensions(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    for name in RECORDED_PACKAGES:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return env


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (``files.write_file``: temporary name, then rename)."""
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_result(path: Path, task: str | None = None) -> dict[str, Any]:
    """A result file, checked to be one (and of ``task`` when given)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable result file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT or "spec" not in data:
        raise ConfigError(
            f"{path}: not an alphatune experiment result (format {RESULT_FORMAT} with a 'spec')"
        )
    if task is not None and data["spec"].get("task") != task:
        raise ConfigError(
            f"{path}: a result of task {data['spec'].get('task')!r} in the folder of task "
            f"{task!r}; move it to its own task's folder"
        )
    return data
