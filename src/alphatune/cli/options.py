"""Argument types (each refuses bad input with a message that says what was expected) and the
option groups several commands share: ``--no-progress``/``--verbose``, and the quantization
settings of ``quantize`` and ``demo``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alphatune.config import AUTO, BCQConfig, EmbeddingMode, LMHeadMode, QuantMethod
from alphatune.models import DEFAULT_MODEL, PACKAGED_MODELS

CALIBRATION_SEQUENCES = 32  # sequences for --method calibrated
CALIBRATION_LENGTH = 512  # tokens per calibration sequence


# ---------------------------------------------------------------- argument types
def _number(
    text: str, convert: Callable[[str], Any], fits: Callable[[Any], bool], what: str
) -> Any:
    """``convert(text)`` if it parses and ``fits``, else an argparse error saying ``what``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not fits(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def finite_float(text: str) -> float:
    return _number(text, float, math.isfinite, "a finite number")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and 0 < v <= 1, "a number in (0, 1]")


def bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer 1..8, got {text!r}") from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(
            f"bits must be 1..8 (3 is the recommended setting), got {value}"
        )
    return value


def group_size(text: str) -> int | str | None:
    if text in ("row", "none", "None"):
        return None
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"group size must be a positive integer, 'row' (one group per row) or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"group size must be positive, got {value}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {path}")
    return path


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"directory not found: {path}")
    return path


def layer_bits(text: str) -> tuple[str, int]:
    """``PATTERN=BITS`` of ``--layer-bits``."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(
            f"expected PATTERN=BITS (e.g. '*.down_proj=4'), got {text!r}"
        )
    return pattern, bits(value)


def adapter_spec(text: str) -> tuple[str | None, Path]:
    """``DIR``, or ``NAME=DIR`` for one of several adapters serving a mixed-task batch."""
    name, sep, directory = text.partition("=")
    if not sep or Path(text).is_dir():
        return None, existing_dir(text)
    if not name:
        raise argparse.ArgumentTypeError(f"expected DIR or NAME=DIR, got {text!r}")
    return name, existing_dir(directory)


def task_file(text: str) -> tuple[str, Path]:
    """``TASK:FILE`` of ``--calibration-pairs``: a training file of a task ``alphatune tune``
    reads (``e2e`` CSV, ``triples`` JSONL)."""
    from alphatune.data import TASKS

    task, sep, path = text.partition(":")
    if not sep or task.lower() not in TASKS:
        raise argparse.ArgumentTypeError(
            f"expected TASK:FILE with TASK one of {', '.join(sorted(TASKS))} "
            f"(e.g. 'e2e:train.csv'), got {text!r}"
        )
    return task.lower(), existing_file(path)


# ---------------------------------------------------------------- shared options
def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_quant_options(parser: argparse.ArgumentParser) -> None:
    """The quantization settings ``quantize`` and ``demo`` share (``bcq_config`` reads them)."""
    defaults = BCQConfig()
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face model directory or name, or a packaged model "
        f"({', '.join(PACKAGED_MODELS)}; default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--bits", type=bits, default=defaults.bits, help="code planes q, 1..8 (default 3)"
    )
    parser.add_argument(
        "--layer-bits",
        type=layer_bits,
        action="append",
        default=[],
        metavar="PATTERN=BITS",
        help="mixed precision: layers whose names match the glob PATTERN get BITS code planes "
        "instead of --bits (repeatable, the first match wins; e.g. '*.down_proj=4')",
    )
    parser.add_argument(
        "--group-size",
        type=group_size,
        default=defaults.group_size,
        help="inputs per scale group: an integer dividing every layer's input size, "
        "'row' for one group per row, or 'auto' (default: divisor nearest 128)",
    )
    parser.add_argument(
        "--method",
        choices=[m.value for m in QuantMethod],
        default=defaults.method.value,
        help="fitting method (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration-sequences",
        type=positive_int,
        default=CALIBRATION_SEQUENCES,
        help=f"calibration sequences of {CALIBRATION_LENGTH} tokens for --method calibrated "
        f"(default {CALIBRATION_SEQUENCES})",
    )
    parser.add_argument(
        "--lm-head",
        choices=[m.value for m in LMHeadMode],
        default=defaults.lm_head.value,
        help="LM head for inference, never tuned: compact (an 8-bit table, the embedding's own "
        "when the model ties them), keep it as is, a bf16 copy, or BCQ with --lm-head-bits "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--embedding",
        choices=[m.value for m in EmbeddingMode],
        default=defaults.embedding.value,
        help="input embedding: compact (an 8-bit table whose rows are dequantized when looked "
        "up) or keep it as is (default: %(default)s)",
    )
    parser.add_argument(
        "--lm-head-bits",
        type=bits,
        default=defaults.lm_head_bits,
        help="code planes of a --lm-head bcq head (default %(default)s)",
    )


def bcq_config(args: argparse.Namespace, **settings: Any) -> BCQConfig:
    """The ``BCQConfig`` that the options of ``add_quant_options`` describe, plus ``settings``."""
    return BCQConfig(
        bits=args.bits,
        layer_bits=tuple(args.layer_bits),
        group_size=args.group_size,
        method=args.method,
        lm_head=args.lm_head,
        lm_head_bits=args.lm_head_bits,
        embedding=args.embedding,
        **settings,
    )
