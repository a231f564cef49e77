"""The ``alphatune`` command: quantize, tune, generate, evaluate, demo, report.

Only this module parses arguments; it builds configs and calls the library. Every check that can
fail (settings, inputs, whether the output may be written) runs before the minutes of work.
Paths and user text are printed as plain text, never as rich markup: ``name[Aromi]`` or a folder
called ``[old]`` is data.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from alphatune.config import (
    AUTO,
    AlphaTuningConfig,
    BCQConfig,
    EmbeddingMode,
    LMHeadMode,
    QuantMethod,
    TrainConfig,
)
from alphatune.errors import AlphaTuneError, CheckpointError, ConfigError
from alphatune.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from alphatune.distributed import DataParallel
    from alphatune.train import TrainResult

console = Console(stderr=False)
# Errors go to stderr unwrapped, so that paths and names in them stay greppable.
error_console = Console(stderr=True, soft_wrap=True)
logger = logging.getLogger("alphatune.cli")


# ---------------------------------------------------------------- argument types
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer 1..8, got {text!r}") from None
    if not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(
            f"bits must be 1..8 (3 is the recommended setting), got {value}"
        )
    return value


def _group_size(text: str) -> int | str | None:
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


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {path}")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"directory not found: {path}")
    return path


def _adapter_spec(text: str) -> tuple[str | None, Path]:
    """``DIR``, or ``NAME=DIR`` for one of several adapters serving a mixed-task batch."""
    name, sep, directory = text.partition("=")
    if not sep or Path(text).is_dir():
        return None, _existing_dir(text)
    if not name:
        raise argparse.ArgumentTypeError(f"expected DIR or NAME=DIR, got {text!r}")
    return name, _existing_dir(directory)


# ---------------------------------------------------------------- progress
@contextmanager
def _progress(enabled: bool) -> Iterator[Progress]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not enabled, transient=True) as bar:
        yield bar


@contextmanager
def _step(message: str) -> Iterator[None]:
    began = time.perf_counter()
    with console.status(Text(message)):
        yield
    seconds = time.perf_counter() - began
    console.print(Text.assemble(("✓ ", "green"), message, (f" ({seconds:.1f} s)", "dim")))


def _inputs(*paths: Any) -> list[Path]:
    """The local files and directories among ``paths`` (what an output must never replace)."""
    return [Path(p) for p in paths if p is not None and Path(p).exists()]


# ---------------------------------------------------------------- commands
def _quantize(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.bases import save_quantized
    from alphatune.data import calibration_batch, default_file
    from alphatune.files import BASE_MARKERS, check_output_dir
    from alphatune.models import load_model, load_tokenizer, local_model_dir
    from alphatune.quantize import quantize_

    config = BCQConfig(
        bits=args.bits,
        group_size=args.group_size,
        method=args.method,
        iterations=args.iterations,
        lm_head=args.lm_head,
        lm_head_bits=args.lm_head_bits,
        embedding=args.embedding,
    )
    # Before minutes of work; never into (or around) the model being read.
    inputs = _inputs(local_model_dir(args.model), args.calibration)
    check_output_dir(Path(args.output), BASE_MARKERS, args.overwrite, inputs)
    with _step(f"loading {args.model}"):
        model = load_model(args.model)
        tokenizer = load_tokenizer(args.model)
    calibration = None
    if config.method == QuantMethod.CALIBRATED:
        path = args.calibration or default_file("calibration", "text")
        calibration = calibration_batch(
            tokenizer, path, args.calibration_sequences, args.calibration_length
        )
        console.print(
            f"calibration: {calibration.shape[0]}×{calibration.shape[1]} tokens from {path}",
            markup=False,
        )
    began = time.perf_counter()
    with _progress(not args.no_progress) as bar:
        task = bar.add_task(f"quantizing to {config.bits} bits ({config.method.value})", total=None)

        def report(stage: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=stage)

        summary = quantize_(model, config, calibration=calibration, progress=report)
    seconds = time.perf_counter() - began
    save_quantized(model, args.output, config, tokenizer, overwrite=args.overwrite)
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
    table.add_row("saved to", Text(str(args.output)))
    console.print(table)
    return {**summary.to_dict(), "seconds": seconds, "output": str(args.output)}


def _training_metrics(result: TrainResult) -> dict[str, float | None]:
    """What an adapter records of its training: the mean loss of the first and of the last 5
    steps, the last evaluation loss, and the seconds it took."""
    first, last = result.train_losses[:5], result.train_losses[-5:]
    return {
        "first_train_loss": sum(first) / len(first) if first else None,
        "train_loss": sum(last) / len(last) if last else None,
        "eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "seconds": round(result.seconds, 1),
    }


def _load_base(base: Path, adapter: Path | None) -> tuple[Any, Any]:
    from alphatune.adapters import load_adapter
    from alphatune.bases import load_quantized

    with _step(f"loading base {base}" + (f" + adapter {adapter}" if adapter else "")):
        model, tokenizer = load_quantized(base)
        if tokenizer is None:
            raise ConfigError(f"{base} holds no tokenizer; re-create it with 'alphatune quantize'")
        if adapter is not None:
            load_adapter(model, adapter)
    return model, tokenizer


def _tune(args: argparse.Namespace) -> dict[str, Any]:
    """α-tune; under ``torchrun`` / ``accelerate launch`` every process runs this, data-parallel."""
    from alphatune.distributed import data_parallel

    with data_parallel() as parallel:
        return _tune_in(args, parallel)


def _tune_in(args: argparse.Namespace, parallel: DataParallel) -> dict[str, Any]:
    from alphatune.adapters import save_adapter
    from alphatune.bases import base_fingerprint
    from alphatune.data import default_file, load_task
    from alphatune.files import ADAPTER_MARKERS, check_output_dir
    from alphatune.train import train
    from alphatune.tuning import prepare_for_alphatuning

    tuning = AlphaTuningConfig(
        train=args.train, train_offset=args.train_offset, alpha_lr_scale=args.alpha_lr_scale
    )
    config = TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_ratio=args.warmup_ratio,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        max_length=args.max_length,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
    )
    output = Path(args.output)
    inputs = _inputs(args.base, args.data, args.eval_data)
    try:
        # --resume continues in a directory that holds a checkpoint: it may be non-empty.
        check_output_dir(output, ADAPTER_MARKERS, args.overwrite or args.resume, inputs)
    except CheckpointError as err:
        hint = "" if args.resume else "; or pass --resume to continue a run there"
        raise CheckpointError(f"{err}{hint}") from None
    train_path = args.data or default_file(args.task, "train")
    train_examples = load_task(args.task, train_path, "train", args.train_limit)
    eval_examples = []
    if args.eval_limit:
        eval_path = args.eval_data or default_file(args.task, "dev")
        eval_examples = load_task(args.task, eval_path, "train", args.eval_limit)
    elif args.eval_every:
        raise ConfigError("--eval-every needs --eval-limit N (how many examples to score)")
    model, tokenizer = _load_base(args.base, None)
    model.to(parallel.device)
    report = prepare_for_alphatuning(model, tuning)
    processes = f"; {parallel.world_size} processes" if parallel.enabled else ""
    if parallel.is_main:
        console.print(
            Text(
                f"trainable parameters: {report.trainable:,} of {report.total:,} "
                f"({report.percent:.3f}%, {report.ratio:,.0f}× fewer); "
                f"{len(train_examples)} training examples from {train_path}{processes}"
            )
        )
    result = train(
        model,
        tokenizer,
        train_examples,
        config,
        tuning,
        eval_examples=eval_examples,
        output_dir=output,
        resume=args.resume,
        progress=not args.no_progress,
        fingerprint=base_fingerprint(model),
    )
    metadata = {
        "task": args.task,
        "train_data": str(train_path),
        "base": str(args.base),
        "steps": result.steps,
        "train": config.to_dict(),
        "processes": parallel.world_size,
        "metrics": _training_metrics(result),
    }
    summary = {
        "trainable": report.trainable,
        "total": report.total,
        "steps": result.steps,
        "seconds": result.seconds,
        "train_losses": result.train_losses,
        "eval_losses": result.eval_losses,
        "output": str(output),
    }
    if not parallel.is_main:
        return summary  # rank 0 writes the adapter; every process holds the same α
    save_adapter(model, output, tuning, metadata=metadata, overwrite=True)
    metrics = metadata["metrics"]
    console.print(
        Text(
            f"trained {result.steps} steps in {result.seconds:.0f} s: loss "
            f"{metrics['first_train_loss']:.3f} → {metrics['train_loss']:.3f}"
            + (f", eval loss {metrics['eval_loss']:.3f}" if result.eval_losses else "")
            + f"; adapter saved to {output}"
        )
    )
    return summary


def _mixed_adapters(args: argparse.Namespace) -> dict[str, Path] | None:
    """``--adapter NAME=DIR`` (several) with one ``--prompt-adapter`` per prompt, or ``None``."""
    specs: list[tuple[str | None, Path]] = args.adapter or []
    named = dict(spec for spec in specs if spec[0] is not None)
    usage = (
        "give one --adapter DIR, or several --adapter NAME=DIR with one --prompt-adapter NAME "
        "per --prompt (a mixed-task batch)"
    )
    if not named:
        if len(specs) > 1 or args.prompt_adapter:
            raise ConfigError(usage)
        return None
    if any(name is None for name, _ in specs):
        raise ConfigError(f"an --adapter without a name among named ones; {usage}")
    if len(named) != len(specs):
        raise ConfigError(f"an adapter name is given twice; {usage}")
    if len(args.prompt_adapter or []) != len(args.prompt):
        raise ConfigError(
            f"{len(args.prompt)} --prompt but {len(args.prompt_adapter or [])} "
            f"--prompt-adapter; {usage}"
        )
    return named


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.data import e2e_prompt
    from alphatune.evaluate import check_prompt_lengths, generate
    from alphatune.mixed import load_adapters

    mixed = _mixed_adapters(args)
    single = None if mixed is not None or not args.adapter else args.adapter[0][1]
    model, tokenizer = _load_base(args.base, single)
    if mixed is not None:
        with _step(f"loading adapters {', '.join(mixed)}"):
            load_adapters(model, mixed)
    prompts = [e2e_prompt(p) if args.task == "e2e" else p for p in args.prompt]
    check_prompt_lengths(model, tokenizer, prompts, args.max_new_tokens)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.beams,
        adapters=args.prompt_adapter if mixed else None,
        progress=not args.no_progress,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        engine={"auto": None, "on": True, "off": False}[args.engine],
    )
    names = args.prompt_adapter if mixed else [None] * len(prompts)
    for prompt, name, text in zip(args.prompt, names, outputs, strict=True):
        console.print(Text(prompt, style="bold") + Text(f"  [{name}]" if name else "", style="dim"))
        console.print(Text(f"→ {text}"))
    return {"outputs": outputs}


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.data import default_file, load_task, load_text_tokens
    from alphatune.evaluate import context_length, perplexity, score_generation
    from alphatune.files import check_output_file, write_file

    path = None if args.perplexity else args.data or default_file(args.task, "test")
    if args.predictions:
        if args.perplexity:
            raise ConfigError("--predictions saves generations; it does not go with --perplexity")
        inputs = _inputs(args.base, args.adapter, path)
        check_output_file(args.predictions, args.overwrite, inputs)
    model, tokenizer = _load_base(args.base, args.adapter)
    if args.perplexity:
        limit = context_length(model)
        if limit is not None and args.context > limit:
            raise ConfigError(
                f"--context {args.context} is longer than the model's context of {limit} "
                f"tokens; use --context {limit} or less"
            )
        tokens = load_text_tokens(tokenizer, args.perplexity, max_tokens=args.max_tokens)
        value = perplexity(model, tokens, context=args.context, progress=not args.no_progress)
        console.print(
            Text(f"perplexity on {args.perplexity} ({tokens.numel()} tokens): {value:.2f}")
        )
        return {"perplexity": value, "tokens": tokens.numel()}
    items = load_task(args.task, path, "eval", args.limit)
    score = score_generation(
        model,
        tokenizer,
        items,
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
    )
    console.print(
        Text.assemble(
            f"BLEU on {score.items} inputs of {path}: ",
            (f"{score.bleu:.2f}", "bold"),
            f" {_interval(score.bleu_interval)}",
        )
    )
    if args.predictions:
        text = "\n".join(score.predictions) + "\n"
        write_file(args.predictions, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return {"bleu": score.bleu, "bleu_interval": list(score.bleu_interval), "items": score.items}


def _interval(interval: tuple[float, float]) -> str:
    return f"(95% bootstrap interval {interval[0]:.1f}–{interval[1]:.1f})"


def _command_args(command: str, *argv: object) -> argparse.Namespace:
    """What ``alphatune COMMAND ARGV...`` parses to: the demo runs the real commands, so every
    option it does not set has the command's own default."""
    return build_parser().parse_args([command, *map(str, argv)])


def _quant_option_names() -> list[str]:
    """The settings ``quantize`` and ``demo`` share (``_add_quant_options``)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_quant_options(parser)
    return [action.dest for action in parser._actions]


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.adapters import load_adapter
    from alphatune.bases import load_quantized
    from alphatune.data import default_file, load_task, seeded_sample
    from alphatune.evaluate import score_generation
    from alphatune.files import ADAPTER_MARKERS, BASE_MARKERS, check_output_dir, write_file
    from alphatune.models import local_model_dir

    work = Path(args.work_dir)
    base, adapter = work / "base", work / "adapter-e2e"
    # Every setting and output is checked before quantizing, not after it.
    TrainConfig(learning_rate=args.lr, max_steps=args.steps)
    inputs = _inputs(local_model_dir(args.model))
    check_output_dir(base, BASE_MARKERS, True, inputs)
    check_output_dir(adapter, ADAPTER_MARKERS, True, inputs)
    started = time.perf_counter()
    console.rule("1/4 quantize")
    common = ["--no-progress"] if args.no_progress else []
    quant_args = _command_args("quantize", "--output", base, "--overwrite", *common)
    for name in _quant_option_names():  # the demo takes the quantize options itself
        setattr(quant_args, name, getattr(args, name))
    quant = _quantize(quant_args)
    # A seeded random sample of the 630 test MRs (the file's first ones are not typical).
    items = seeded_sample(load_task("e2e", default_file("e2e", "test"), "eval"), args.eval_limit, 0)
    console.rule("2/4 score the quantized model before tuning")
    model, tokenizer = load_quantized(base)
    before = score_generation(
        model, tokenizer, items, num_beams=args.beams, progress=not args.no_progress
    )
    console.print(f"BLEU before tuning: {before.bleu:.2f} {_interval(before.bleu_interval)}")
    console.rule("3/4 α-tune on an E2E slice")
    tuned = _tune(
        _command_args(
            "tune",
            *("--base", base, "--task", "e2e", "--output", adapter, "--overwrite"),
            *("--train-limit", args.train_limit, "--eval-limit", args.eval_examples),
            *("--lr", args.lr, "--max-steps", args.steps),
            *common,
        )
    )
    console.rule("4/4 score the tuned model")
    load_adapter(model, adapter)
    after = score_generation(
        model, tokenizer, items, num_beams=args.beams, progress=not args.no_progress
    )
    adapter_bytes = sum(f.stat().st_size for f in adapter.glob("adapter*"))
    table = Table(title="AlphaTuning demo (SmolLM2-135M-Instruct, E2E)", show_header=False)
    table.add_row("bits per weight", f"{quant['bits_per_weight']:.3f}")
    table.add_row(
        "quantized layers",
        f"{quant['quantized_bytes'] / 2**20:.1f} MiB vs fp32 "
        f"{quant['fp32_bytes'] / 2**20:.1f} MiB ({quant['compression_vs_fp32']:.1f}×)",
    )
    table.add_row(
        "trainable parameters",
        f"{tuned['trainable']:,} of {tuned['total']:,} "
        f"({tuned['total'] / tuned['trainable']:,.0f}× fewer)",
    )
    table.add_row("adapter size", f"{adapter_bytes / 1024:.0f} KiB")
    table.add_row(
        f"BLEU on {len(items)} E2E test inputs (seeded sample), before → after",
        f"{before.bleu:.2f} → [bold]{after.bleu:.2f}[/] {_interval(after.bleu_interval)}",
    )
    # Text, not markup: E2E inputs are full of brackets such as eatType[pub].
    table.add_row("example", Text(f"{items[0].prompt}\n→ {after.predictions[0]}"))
    table.add_row("files", Text(f"base {base}\nadapter {adapter}"))
    table.add_row("total time", f"{time.perf_counter() - started:.0f} s")
    console.print(table)
    result = {
        "quantize": quant,
        "bleu_before": before.bleu,
        "bleu_after": after.bleu,
        "bleu_after_interval": list(after.bleu_interval),
        "trainable": tuned["trainable"],
        "total_params": tuned["total"],
        "adapter_bytes": adapter_bytes,
        "steps": tuned["steps"],
        "final_train_loss": tuned["train_losses"][-1],
        "seconds": time.perf_counter() - started,
    }
    text = json.dumps(result, indent=2)
    write_file(work / "demo_results.json", lambda path: path.write_text(text))
    return result


# ---------------------------------------------------------------- parser
def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_quant_options(parser: argparse.ArgumentParser) -> None:
    defaults = BCQConfig()
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"Hugging Face model directory or name (default: the embedded {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--bits", type=_bits, default=defaults.bits, help="code planes q, 1..8 (default 3)"
    )
    parser.add_argument(
        "--group-size",
        type=_group_size,
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
        type=_positive_int,
        default=32,
        help="calibration sequences of 512 tokens for --method calibrated (default 32)",
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
        type=_bits,
        default=defaults.lm_head_bits,
        help="code planes of a --lm-head bcq head (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alphatune",
        description="Quantize a language model with binary-coding quantization and α-tune it per task.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save the base directory")
    _add_quant_options(q)
    q.add_argument(
        "--iterations", type=_non_negative_int, default=10, help="alternating refinement rounds"
    )
    q.add_argument(
        "--calibration",
        type=_existing_file,
        default=None,
        help="text file for calibration (default: WikiText-2 valid from the data directory)",
    )
    q.add_argument("--calibration-length", type=_positive_int, default=512)
    q.add_argument("--output", required=True, type=Path, help="directory for the quantized base")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_common(q)

    t = sub.add_parser(
        "tune",
        help="α-tune a quantized base on a task; saves a small adapter",
        description="α-tune a quantized base on a task; saves a small adapter. Data-parallel: "
        "start it with 'torchrun --nproc-per-node N -m alphatune.cli tune ...' (or accelerate "
        "launch); --batch-size stays the global micro-batch, split across the N processes.",
    )
    t.add_argument("--base", required=True, type=_existing_dir, help="quantized base directory")
    t.add_argument("--task", choices=["e2e", "triples"], default="e2e")
    t.add_argument(
        "--data",
        type=_existing_file,
        default=None,
        help="training file (default: the task's train split)",
    )
    t.add_argument(
        "--eval-data",
        type=_existing_file,
        default=None,
        help="file for eval loss (default: dev split)",
    )
    t.add_argument(
        "--train-limit", type=_positive_int, default=None, help="use the first N training examples"
    )
    t.add_argument(
        "--eval-limit", type=_positive_int, default=None, help="eval-loss examples (default none)"
    )
    t.add_argument("--output", required=True, type=Path, help="adapter directory")
    defaults = TrainConfig()
    t.add_argument("--lr", type=_positive_float, default=defaults.learning_rate)
    t.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    t.add_argument("--grad-accum", type=_positive_int, default=defaults.grad_accum)
    t.add_argument("--epochs", type=_positive_float, default=defaults.epochs)
    t.add_argument("--max-steps", type=_positive_int, default=None)
    t.add_argument("--warmup-ratio", type=_finite_float, default=defaults.warmup_ratio)
    t.add_argument("--label-smoothing", type=_finite_float, default=defaults.label_smoothing)
    t.add_argument("--max-length", type=_positive_int, default=defaults.max_length)
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument(
        "--train", choices=["alpha1", "all_alpha"], default="alpha1", help="which scales train"
    )
    t.add_argument("--train-offset", action="store_true", help="also train the offsets")
    t.add_argument(
        "--alpha-lr-scale",
        type=_positive_float,
        default=1.0,
        help="multiplies the scales' learning rate",
    )
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    t.add_argument("--overwrite", action="store_true", help="replace an existing adapter directory")
    _add_common(t)

    g = sub.add_parser("generate", help="generate text with a quantized base (and adapter)")
    g.add_argument("--base", required=True, type=_existing_dir)
    g.add_argument(
        "--adapter",
        type=_adapter_spec,
        action="append",
        metavar="[NAME=]DIR",
        help="adapter directory; repeat as NAME=DIR to serve several in one batch",
    )
    g.add_argument("--prompt", action="append", required=True, help="input (repeatable)")
    g.add_argument(
        "--prompt-adapter",
        action="append",
        metavar="NAME",
        help="adapter of the --prompt at the same position (with NAME=DIR adapters)",
    )
    g.add_argument(
        "--task",
        choices=["e2e", "raw"],
        default="e2e",
        help="e2e: the prompt is a meaning representation; raw: used as is",
    )
    g.add_argument("--max-new-tokens", type=_positive_int, default=64)
    g.add_argument("--beams", type=_positive_int, default=1)
    g.add_argument(
        "--sample", action="store_true", help="sample instead of greedy decoding (seeded)"
    )
    g.add_argument("--temperature", type=_positive_float, default=1.0)
    g.add_argument("--top-k", type=_positive_int, default=None)
    g.add_argument("--top-p", type=_fraction, default=None)
    g.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed")
    g.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="end an answer at TEXT"
    )
    g.add_argument(
        "--engine",
        choices=["auto", "on", "off"],
        default="auto",
        help="the native decode engine: where it serves the model (auto), required (on), or "
        "transformers generate (off); default: %(default)s",
    )
    _add_common(g)

    e = sub.add_parser("evaluate", help="BLEU on a task (or perplexity on a text file)")
    e.add_argument("--base", required=True, type=_existing_dir)
    e.add_argument("--adapter", type=_existing_dir, default=None)
    e.add_argument("--task", choices=["e2e", "triples"], default="e2e")
    e.add_argument(
        "--data", type=_existing_file, default=None, help="eval file (default: the test split)"
    )
    e.add_argument("--limit", type=_positive_int, default=None, help="first N inputs")
    e.add_argument("--beams", type=_positive_int, default=1)
    e.add_argument("--max-new-tokens", type=_positive_int, default=64)
    e.add_argument("--predictions", type=Path, default=None, help="write generations here")
    e.add_argument(
        "--overwrite", action="store_true", help="replace an existing --predictions file"
    )
    e.add_argument(
        "--perplexity", type=_existing_file, default=None, help="score perplexity on this text file"
    )
    e.add_argument("--max-tokens", type=_positive_int, default=8192)
    e.add_argument("--context", type=_positive_int, default=512)
    _add_common(e)

    d = sub.add_parser("demo", help="quantize → score → α-tune on E2E → score, in one go")
    _add_quant_options(d)
    d.add_argument("--work-dir", type=Path, default=Path("runs/demo"))
    d.add_argument("--train-limit", type=_positive_int, default=2000)
    d.add_argument("--steps", type=_positive_int, default=100)
    d.add_argument("--lr", type=_positive_float, default=TrainConfig().learning_rate)
    d.add_argument("--eval-limit", type=_positive_int, default=48, help="E2E test inputs to score")
    d.add_argument(
        "--eval-examples", type=_positive_int, default=64, help="dev examples for eval loss"
    )
    d.add_argument("--beams", type=_positive_int, default=1)
    _add_common(d)

    r = sub.add_parser(
        "report", help="render the comparison's result files into docs/results.md with plots"
    )
    r.add_argument(
        "--results",
        type=Path,
        default=Path("benchmarks/results/paper"),
        help="folder of result files (python -m alphatune.experiments grid writes them)",
    )
    r.add_argument("--output", type=Path, default=Path("docs/results.md"))
    _add_common(r)
    return parser


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.experiments.report import render

    render(args.results, args.output)
    console.print(Text(f"wrote {args.output} (plots in {args.output.parent / 'results'})"))
    return {"output": str(args.output)}


COMMANDS = {
    "quantize": _quantize,
    "tune": _tune,
    "generate": _generate,
    "evaluate": _evaluate,
    "demo": _demo,
    "report": _report,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )
    logging.getLogger("alphatune").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not args.verbose:
        # transformers' own per-file loading bars add noise to ours.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        COMMANDS[args.command](args)
    except AlphaTuneError as err:
        # Plain text: messages quote user data such as "name[Aromi]", which is not markup.
        error_console.print(Text("error: ", style="red") + Text(str(err)), highlight=False)
        return 2
    except OSError as err:
        # The disk filled up, a file vanished, a permission changed mid-run: say so plainly
        # (a traceback with --verbose).
        if args.verbose:
            raise
        error_console.print(Text("error: ", style="red") + Text(str(err)), highlight=False)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
