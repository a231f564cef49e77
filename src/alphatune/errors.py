"""Exceptions raised by alphatune.

Defined in ``alphatune_runtime.errors`` (the torch-free decode runtime raises them too) and
re-exported here, where users of ``alphatune`` import them. Every message says what was expected,
what was found, and what to do about it.
"""

from __future__ import annotations

from alphatune_runtime.errors import (
    AlphaTuneError,
    CheckpointError,
    ConfigError,
    DataError,
    KernelUnavailableError,
    TrainingError,
    UnsupportedModelError,
)

__all__ = [
    "AlphaTuneError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "KernelUnavailableError",
    "TrainingError",
    "UnsupportedModelError",
]
