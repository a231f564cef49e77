"""``alphatune tune``: α-tune a quantized base on a task and save the adapter; data-parallel under
``torchrun`` / ``accelerate launch``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.text import Text

from alphatune.cli import options
from alphatune.cli.console import console
from alphatune.cli.loading import existing_inputs, load_base
from alphatune.config import AlphaTuningConfig, TrainConfig
from alphatune.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from alphatune.train import TrainResult


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser(
        "tune",
        help="α-tune a quantized base on a task; saves a small adapter",
        description="α-tune a quantized base on a task; saves a small adapter. Data-parallel: "
        "start it with 'torchrun --nproc-per-node N -m alphatune.cli tune ...' (or accelerate "
        "launch); --batch-size stays the global micro-batch, split across the N processes.",
    )
    t.add_argument(
        "--base", required=True, type=options.existing_dir, help="quantized base directory"
    )
    t.add_argument("--task", choices=["e2e", "triples"], default="e2e")
    t.add_argument(
        "--data",
        type=options.existing_file,
        default=None,
        help="training file (default: the task's train split)",
    )
    t.add_argument(
        "--eval-data",
        type=options.existing_file,
        default=None,
        help="file for eval loss (default: dev split)",
    )
    t.add_argument(
        "--train-limit",
        type=options.positive_int,
        default=None,
        help="use the first N training examples",
    )
    t.add_argument(
        "--eval-limit",
        type=options.positive_int,
        default=None,
        help="eval-loss examples (default none)",
    )
    t.add_argument("--output", required=True, type=Path, help="adapter directory")
    defaults = TrainConfig()
    t.add_argument("--lr", type=options.positive_float, default=defaults.learning_rate)
    t.add_argument("--batch-size", type=options.positive_int, default=defaults.batch_size)
    t.add_argument("--grad-accum", type=options.positive_int, default=defaults.grad_accum)
    t.add_argument("--epochs", type=options.positive_float, default=defaults.epochs)
    t.add_argument("--max-steps", type=options.positive_int, default=defaults.max_steps)
    t.add_argument("--warmup-ratio", type=options.finite_float, default=defaults.warmup_ratio)
    t.add_argument("--label-smoothing", type=options.finite_float, default=defaults.label_smoothing)
    t.add_argument("--max-length", type=options.positive_int, default=defaults.max_length)
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    t.add_argument("--eval-every", type=int, default=defaults.eval_every)
    tuning = AlphaTuningConfig()
    t.add_argument(
        "--train",
        choices=["alpha1", "all_alpha"],
        default=tuning.train.value,
        help="which scales train",
    )
    t.add_argument("--train-offset", action="store_true", help="also train the offsets")
    t.add_argument(
        "--alpha-lr-scale",
        type=options.positive_float,
        default=tuning.alpha_lr_scale,
        help="multiplies the scales' learning rate",
    )
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    t.add_argument("--overwrite", action="store_true", help="replace an existing adapter directory")
    options.add_common(t)


def tune_configs(args: argparse.Namespace) -> tuple[AlphaTuningConfig, TrainConfig]:
    """What ``alphatune tune`` trains, and how."""
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
    return tuning, config


def run(args: argparse.Namespace) -> dict[str, Any]:
    tuning, config = tune_configs(args)
    return tune_adapter(
        args.base,
        args.output,
        tuning,
        config,
        task=args.task,
        data=args.data,
        eval_data=args.eval_data,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def training_metrics(result: TrainResult) -> dict[str, float | None]:
    """What an adapter records of its training: the mean loss of the first and of the last 5
    steps, the last evaluation loss, and the seconds it took."""
    first, last = result.train_losses[:5], result.train_losses[-5:]
    return {
        "first_train_loss": sum(first) / len(first) if first else None,
        "train_loss": sum(last) / len(last) if last else None,
        "eval_loss": result.eval_losses[-1][1] if result.eval_losses else None,
        "seconds": round(result.seconds, 1),
    }


def tune_adapter(
    base: Path,
    output: Path,
    tuning: AlphaTuningConfig,
    config: TrainConfig,
    *,
    task: str,
    data: Path | None = None,
    eval_data: Path | None = None,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """α-tune the base in ``base`` on ``task`` and save the adapter in ``output``; under
    ``torchrun`` / ``accelerate launch`` every process runs this, data-parallel.

    Args:
        data, eval_data: training and eval-loss files (default: the task's train and dev splits).
        train_limit: the first N training examples; ``eval_limit``: eval-loss examples (none
            without it).
        resume: continue from the checkpoint in ``output``.

    Returns:
        Parameter counts, steps, seconds, the losses and ``output``.
    """
    from alphatune.adapters import save_adapter
    from alphatune.bases import base_fingerprint
    from alphatune.data import default_file, load_task
    from alphatune.distributed import data_parallel
    from alphatune.files import ADAPTER_MARKERS, check_output_dir
    from alphatune.train import train
    from alphatune.tuning import prepare_for_alphatuning

    with data_parallel() as parallel:
        output = Path(output)
        inputs = existing_inputs(base, data, eval_data)
        try:
            # --resume continues in a directory that holds a checkpoint: it may be non-empty.
            check_output_dir(output, ADAPTER_MARKERS, overwrite or resume, inputs)
        except CheckpointError as err:
            hint = "" if resume else "; or pass --resume to continue a run there"
            raise CheckpointError(f"{err}{hint}") from None
        train_path = data or default_file(task, "train")
        train_examples = load_task(task, train_path, "train", train_limit)
        eval_examples = []
        if eval_limit:
            eval_path = eval_data or default_file(task, "dev")
            eval_examples = load_task(task, eval_path, "train", eval_limit)
        elif config.eval_every:
            raise ConfigError("--eval-every needs --eval-limit N (how many examples to score)")
        model, tokenizer = load_base(base, None)
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
            resume=resume,
            progress=progress,
            fingerprint=base_fingerprint(model),
        )
        metadata = {
            "task": task,
            "train_data": str(train_path),
            "base": str(base),
            "steps": result.steps,
            "train": config.to_dict(),
            "processes": parallel.world_size,
            "metrics": training_metrics(result),
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
