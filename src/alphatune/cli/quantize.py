"""``alphatune quantize``: quantize a model and save the base directory."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from alphatune.calibration import HESSIAN_PRECISIONS
from alphatune.cli import options
from alphatune.cli.console import console, progress_bar, timed_step
from alphatune.cli.loading import existing_inputs
from alphatune.config import BCQConfig, LMHeadMode, QuantMethod
from alphatune.data.calibration_pairs import DEFAULT_PAIR_SHARE
from alphatune.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    q = sub.add_parser("quantize", help="quantize a model and save the base directory")
    options.add_quant_options(q)
    q.add_argument(
        "--iterations",
        type=options.non_negative_int,
        default=BCQConfig().iterations,
        help="alternating refinement rounds",
    )
    q.add_argument(
        "--calibration",
        type=options.existing_file,
        default=None,
        help="text file for calibration (default: WikiText-2 valid from the data directory)",
    )
    q.add_argument(
        "--calibration-length", type=options.positive_int, default=options.CALIBRATION_LENGTH
    )
    q.add_argument(
        "--calibration-pairs",
        type=options.task_file,
        action="append",
        default=None,
        metavar="TASK:FILE",
        help="also calibrate on training pairs as tuning sees them (prompt, target, end of text; "
        "repeat for several tasks, their pairs alternate), e.g. triples:train.jsonl. On WebNLG "
        "this kept more input facts at 3 bits (docs/choosing.md)",
    )
    q.add_argument(
        "--pair-share",
        type=options.fraction,
        default=None,
        help="share of the calibration sequences cut from --calibration-pairs (default "
        f"{DEFAULT_PAIR_SHARE}); the rest from --calibration",
    )
    q.add_argument(
        "--hessian-precision",
        choices=HESSIAN_PRECISIONS,
        default="auto",
        help="how the calibration passes recording the Hessians multiply (auto: bfloat16 inputs "
        "with float32 sums where the CPU has native bfloat16, ~15%% faster; float32 elsewhere)",
    )
    q.add_argument("--output", required=True, type=Path, help="directory for the quantized base")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    options.add_common(q)


def quant_config(args: argparse.Namespace) -> BCQConfig:
    """What ``alphatune quantize`` quantizes with."""
    return options.bcq_config(args, iterations=args.iterations)


def _pair_share(args: argparse.Namespace) -> float:
    if args.pair_share is not None and not args.calibration_pairs:
        raise ConfigError("--pair-share is the share of --calibration-pairs; give those too")
    return DEFAULT_PAIR_SHARE if args.pair_share is None else args.pair_share


def run(args: argparse.Namespace) -> dict[str, Any]:
    return quantize_base(
        args.model,
        args.output,
        quant_config(args),
        calibration=args.calibration,
        calibration_pairs=args.calibration_pairs or (),
        pair_share=_pair_share(args),
        calibration_sequences=args.calibration_sequences,
        calibration_length=args.calibration_length,
        hessian_precision=args.hessian_precision,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def _calibration_batch(
    tokenizer: Any,
    path: Path,
    calibration_pairs: Sequence[tuple[str, Path]],
    pair_share: float,
    sequences: int,
    length: int,
) -> Any:
    """The calibration token ids: rows of ``path``, and ``pair_share`` of them from the training
    pairs when any are given; says on the console where they came from."""
    from alphatune.data import calibration_batch, load_task, mixed_calibration
    from alphatune.data.calibration_pairs import pair_rows

    if not calibration_pairs:
        batch = calibration_batch(tokenizer, path, sequences, length)
        console.print(
            f"calibration: {batch.shape[0]}×{batch.shape[1]} tokens from {path}", markup=False
        )
        return batch
    sources = [load_task(task, file, "train") for task, file in calibration_pairs]
    batch = mixed_calibration(tokenizer, path, sources, sequences, length, pair_share)
    rows = pair_rows(sequences, pair_share)
    files = ", ".join(f"{task}:{file}" for task, file in calibration_pairs)
    console.print(
        f"calibration: {batch.shape[0]}×{batch.shape[1]} tokens, {sequences - rows} rows "
        f"from {path} and {rows} from the training pairs of {files}",
        markup=False,
    )
    return batch


def quantize_base(
    model_name: str,
    output: Path,
    config: BCQConfig,
    *,
    calibration: Path | None = None,
    calibration_pairs: Sequence[tuple[str, Path]] = (),
    pair_share: float = DEFAULT_PAIR_SHARE,
    calibration_sequences: int = options.CALIBRATION_SEQUENCES,
    calibration_length: int = options.CALIBRATION_LENGTH,
    hessian_precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize ``model_name`` with ``config``, save the base in ``output`` and print a summary.

    Args:
        calibration: text file for ``method="calibrated"`` (default: WikiText-2 valid).
        calibration_pairs: ``(task, training file)`` pairs; ``pair_share`` of the calibration
            sequences are cut from their pairs (``alphatune.data.mixed_calibration``).
        calibration_sequences, calibration_length: how much of it, in sequences of tokens.
        hessian_precision: ``quantize_``'s ``hessian_precision``.

    Returns:
        The quantization summary (``QuantizeSummary.to_dict``), with ``seconds`` and ``output``.
    """
    from alphatune.bases import save_quantized
    from alphatune.data import default_file
    from alphatune.files import BASE_MARKERS, check_output_dir
    from alphatune.models import load_model, load_tokenizer, local_model_dir
    from alphatune.quantize import quantize_

    # Before minutes of work; never into (or around) the model being read.
    if calibration_pairs and config.method != QuantMethod.CALIBRATED:
        raise ConfigError(
            f"--calibration-pairs needs --method calibrated (got {config.method.value}): only "
            "the calibrated method reads calibration text"
        )
    pair_files = [path for _, path in calibration_pairs]
    inputs = existing_inputs(local_model_dir(model_name), calibration, *pair_files)
    check_output_dir(Path(output), BASE_MARKERS, overwrite, inputs)
    with timed_step(f"loading {model_name}"):
        model = load_model(model_name)
        tokenizer = load_tokenizer(model_name)
    batch = None
    if config.method == QuantMethod.CALIBRATED:
        path = calibration or default_file("calibration", "text")
        batch = _calibration_batch(
            tokenizer,
            path,
            calibration_pairs,
            pair_share,
            calibration_sequences,
            calibration_length,
        )
    began = time.perf_counter()
    with progress_bar(progress) as bar:
        mixed = "".join(f", {p} at {b}" for p, b in config.layer_bits)
        description = f"quantizing to {config.bits} bits{mixed} ({config.method.value})"
        task = bar.add_task(description, total=None)

        def report(stage: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=stage)

        summary = quantize_(
            model,
            config,
            calibration=batch,
            hessian_precision=hessian_precision,
            progress=report,
        )
    seconds = time.perf_counter() - began
    save_quantized(model, output, config, tokenizer, overwrite=overwrite)
    table = Table(title="quantized base", show_header=False)
    table.add_row("layers", str(summary.layers))
    table.add_row("bits per weight (codes+scales+offsets)", f"{summary.bits_per_weight:.3f}")
    table.add_row(
        "quantized layers",
        f"{summary.quantized_bytes / 2**20:.1f} MiB "
        f"(fp32 {summary.fp32_bytes / 2**20:.1f} MiB, fp16 {summary.fp16_bytes / 2**20:.1f} MiB)",
    )
    table.add_row(
        "compression vs fp32 / fp16",
        f"{summary.compression_vs_fp32:.2f}× / {summary.compression_vs_fp16:.2f}×",
    )
    if summary.embedding_bytes:
        table.add_row(
            "embedding (8-bit table, frozen)", f"{summary.embedding_bytes / 2**20:.1f} MiB"
        )
    if summary.lm_head != LMHeadMode.KEEP.value:
        shares = summary.lm_head == LMHeadMode.COMPACT.value and not summary.lm_head_bytes
        table.add_row(
            "LM head (frozen)",
            f"{summary.lm_head}: shares the embedding's table"
            if shares
            else f"{summary.lm_head} {summary.lm_head_bytes / 2**20:.1f} MiB",
        )
    table.add_row("whole model as stored", f"{summary.model_bytes / 2**20:.1f} MiB")
    table.add_row("quantization time", f"{seconds:.1f} s")
    table.add_row("saved to", Text(str(output)))
    console.print(table)
    return {**summary.to_dict(), "seconds": seconds, "output": str(output)}
