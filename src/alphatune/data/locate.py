"""Where the data sets live: the shared data directory, each task's default files, and
calibration batches cut from a text file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alphatune.data.text import load_text_tokens
from alphatune.data.tokenize import start_ids
from alphatune.errors import DataError

DATA_ENV = "ALPHATUNE_DATA_DIR"

# Default files inside the shared data directory, per task and role.
DEFAULT_FILES = {
    ("e2e", "train"): "e2e/train.csv",
    ("e2e", "dev"): "e2e/dev.csv",
    ("e2e", "test"): "e2e/test.csv",
    ("triples", "train"): "webnlg/train.jsonl",
    ("triples", "dev"): "webnlg/dev.jsonl",
    ("triples", "test"): "webnlg/test.jsonl",
    ("calibration", "text"): "wikitext-2/valid.txt",
}


def find_data_dir() -> Path:
    """The shared data directory: ``$ALPHATUNE_DATA_DIR``, else ``./shared/data`` or ``../shared/data``."""
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(
        "no data directory found: pass the file explicitly (--data FILE) or set "
        f"{DATA_ENV} to the folder holding e2e/, webnlg/ and wikitext-2/"
    )


def default_file(task: str, role: str) -> Path:
    """Default data file for ``task`` (``e2e``, ``triples``, ``calibration``) and role."""
    relative = DEFAULT_FILES.get((task, role))
    if relative is None:
        raise DataError(f"no default {role} file for task {task!r}; pass --data FILE")
    path = find_data_dir() / relative
    if not path.is_file():
        raise DataError(
            f"default {role} file for task {task!r} not found at {path}; pass it explicitly"
        )
    return path


def calibration_batch(
    tokenizer: Any, path: str | os.PathLike[str], sequences: int, length: int
) -> Tensor:
    """``(sequences, length)`` token ids cut from the start of a text file (for calibration).

    Each row starts with the tokenizer's BOS when it adds one (``start_ids``; Gemma), as the
    model sees text, followed by the next ``length - 1`` tokens of the file; otherwise (SmolLM2)
    a row is ``length`` consecutive tokens.
    """
    start = start_ids(tokenizer)
    width = length - len(start)  # file tokens per row
    if width < 1:
        raise DataError(f"calibration length {length} leaves no room after the BOS")
    tokens = load_text_tokens(tokenizer, path, max_tokens=sequences * width)
    if tokens.numel() < sequences * width:
        raise DataError(
            f"{path} has only {tokens.numel()} tokens; {sequences}×{width} are needed for "
            "calibration (use fewer --calibration-sequences or a longer file)"
        )
    rows = tokens[: sequences * width].reshape(sequences, width)
    return torch.cat([torch.tensor(start, dtype=torch.long).expand(sequences, -1), rows], dim=1)
