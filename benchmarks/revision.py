"""The source a benchmark measured: the git commit and whether the tree had uncommitted changes.

Imported as ``revision`` by the scripts in this folder (``python benchmarks/<name>.py``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def source_revision() -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the repository (``None`` values outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    # Results files are what a run writes (an earlier benchmark of the same session may have
    # just rewritten one): they are not the measured source.
    status = git(
        "status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks",
        ":(exclude)benchmarks/results",
    )  # fmt: skip
    return {"commit": commit, "dirty": None if status is None else bool(status)}
