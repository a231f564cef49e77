"""The source a benchmark measured: the git commit and whether the tree had uncommitted changes.

Imported as ``revision`` by the scripts in this folder (``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    """``git args`` in the repository, its output; ``None`` outside git or on failure."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def changed_since(commit: str | None, paths: tuple[str, ...]) -> list[str] | None:
    """Short hashes of the commits after ``commit`` (to HEAD) that changed ``paths``, newest
    first: what a results file measured at ``commit`` no longer measures. ``None`` when that
    cannot be told (no commit recorded, one git does not know, or no git)."""
    if not commit:
        return None
    base = commit.removesuffix("+dirty")  # how some older results marked a dirty tree
    if _git("cat-file", "-e", f"{base}^{{commit}}") is None:
        return None
    log = _git("log", "--format=%h", f"{base}..HEAD", "--", *paths)
    return None if log is None else log.split()


def source_revision() -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the repository (``None`` values outside git)."""
    commit = _git("rev-parse", "HEAD")
    # Results files are what a run writes (an earlier benchmark of the same session may have
    # just rewritten one): they are not the measured source.
    status = _git(
        "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks",
        ":(exclude)benchmarks/results",
    )  # fmt: skip
    return {"commit": commit, "dirty": None if status is None else bool(status)}
