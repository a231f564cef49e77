"""Fixtures for the data tests: where the shared data sets live."""

from __future__ import annotations

from pathlib import Path

import pytest


def _repo_root() -> Path:
    """The directory holding ``pyproject.toml`` above this file."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise RuntimeError(f"no pyproject.toml above {__file__}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``; the test is skipped when that folder is absent."""
    path = (_repo_root().parent / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"shared data sets not found at {path} (expected <repo>/../shared/data)")
    return path
