"""Writing files without losing what the user had.

- Output directories are written file by file: each file goes to a temporary name in the same
  directory and is then renamed over its target, so a crash never leaves a half-written file and
  files that are not ours are never touched.
- A non-empty directory is only written to with ``overwrite=True``, and only if it already holds
  one of our marker files (a base, an adapter, a checkpoint): we never delete or replace a
  directory someone else owns.
- Whole directories (training checkpoints) are replaced by renaming the old one aside first, so
  one complete copy exists at every moment.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from alphatune.errors import CheckpointError

Writer = Callable[[Path], None]


def check_output_dir(directory: Path, markers: Iterable[str], overwrite: bool) -> None:
    """Raise unless ``directory`` is absent/empty, or ``overwrite`` and it holds one of ``markers``."""
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is a file; choose a directory path")
    if not directory.exists() or not any(directory.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(
            f"{directory} exists and is not empty; choose another output directory or pass "
            "overwrite=True (--overwrite) to replace it"
        )
    if not any((directory / marker).exists() for marker in markers):
        raise CheckpointError(
            f"{directory} is not empty and was not written by alphatune (none of "
            f"{sorted(markers)} found); refusing to overwrite it, choose another directory"
        )


def write_files(directory: Path, writers: Mapping[str, Writer]) -> None:
    """Write each named file atomically (temporary name, then rename) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in writers.items():
        target = directory / name
        tmp = directory / f".{name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def replace_directory(directory: Path, write: Writer) -> None:
    """Build a new ``directory`` beside the old one and swap it in; a complete copy always exists."""
    new = directory.with_name(directory.name + ".new")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    write(new)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    new.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def existing_directory(directory: Path) -> Path | None:
    """``directory`` if it exists, else a complete ``.old`` copy left by an interrupted swap."""
    if directory.exists():
        return directory
    old = directory.with_name(directory.name + ".old")
    return old if old.exists() else None
