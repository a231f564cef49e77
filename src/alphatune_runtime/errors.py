"""Exceptions raised by alphatune and its runtime (``alphatune.errors`` re-exports them).

They live here, in the package without torch, so that the decode runtime raises the same errors
a user of ``alphatune`` catches. Every message says what was expected, what was found, and what to
do about it.
"""

from __future__ import annotations


class AlphaTuneError(Exception):
    """Base class of every error alphatune raises on purpose."""


class ConfigError(AlphaTuneError, ValueError):
    """A configuration value is out of range or inconsistent with the model."""


class UnsupportedModelError(AlphaTuneError):
    """The model has no layers alphatune knows how to quantize."""


class KernelUnavailableError(AlphaTuneError):
    """A requested kernel cannot run here (missing optional dependency or device)."""


class CheckpointError(AlphaTuneError):
    """A saved base, adapter or checkpoint is missing, corrupted or does not match."""


class DataError(AlphaTuneError, ValueError):
    """A data file is missing or not in the expected format."""


class TrainingError(AlphaTuneError):
    """Training cannot go on: the loss, gradients or trained values became NaN or infinite."""
