"""``alphatune demo``: quantize → score → α-tune on E2E → score, in one go.

It runs the real commands (``quantize_base``, ``tune_adapter``) with configs built from the
library's defaults, the same ones ``alphatune quantize`` and ``alphatune tune`` start from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from alphatune.cli import options
from alphatune.cli.console import console, format_interval
from alphatune.cli.loading import existing_inputs
from alphatune.cli.quantize import quantize_base
from alphatune.cli.tune import tune_adapter
from alphatune.config import AlphaTuningConfig, TrainConfig


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("demo", help="quantize → score → α-tune on E2E → score, in one go")
    options.add_quant_options(d)
    d.add_argument("--work-dir", type=Path, default=Path("runs/demo"))
    d.add_argument("--train-limit", type=options.positive_int, default=2000)
    d.add_argument("--steps", type=options.positive_int, default=100)
    d.add_argument("--lr", type=options.positive_float, default=TrainConfig().learning_rate)
    d.add_argument(
        "--eval-limit", type=options.positive_int, default=48, help="E2E test inputs to score"
    )
    d.add_argument(
        "--eval-examples", type=options.positive_int, default=64, help="dev examples for eval loss"
    )
    d.add_argument("--beams", type=options.positive_int, default=1)
    options.add_common(d)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from alphatune.adapters import load_adapter
    from alphatune.bases import load_quantized
    from alphatune.data import default_file, load_task, seeded_sample
    from alphatune.evaluate import score_generation
    from alphatune.files import ADAPTER_MARKERS, BASE_MARKERS, check_output_dir, write_file
    from alphatune.models import local_model_dir

    work = Path(args.work_dir)
    base, adapter = work / "base", work / "adapter-e2e"
    progress = not args.no_progress
    # Every setting and output is checked before quantizing, not after it.
    quant_config = options.bcq_config(args)
    train_config = TrainConfig(learning_rate=args.lr, max_steps=args.steps)
    inputs = existing_inputs(local_model_dir(args.model))
    check_output_dir(base, BASE_MARKERS, True, inputs)
    check_output_dir(adapter, ADAPTER_MARKERS, True, inputs)
    started = time.perf_counter()
    console.rule("1/4 quantize")
    quant = quantize_base(
        args.model,
        base,
        quant_config,
        calibration_sequences=args.calibration_sequences,
        overwrite=True,
        progress=progress,
    )
    # A seeded random sample of the 630 test MRs (the file's first ones are not typical).
    items = seeded_sample(load_task("e2e", default_file("e2e", "test"), "eval"), args.eval_limit, 0)
    console.rule("2/4 score the quantized model before tuning")
    model, tokenizer = load_quantized(base)
    before = score_generation(model, tokenizer, items, num_beams=args.beams, progress=progress)
    console.print(f"BLEU before tuning: {before.bleu:.2f} {format_interval(before.bleu_interval)}")
    console.rule("3/4 α-tune on an E2E slice")
    tuned = tune_adapter(
        base,
        adapter,
        AlphaTuningConfig(),
        train_config,
        task="e2e",
        train_limit=args.train_limit,
        eval_limit=args.eval_examples,
        overwrite=True,
        progress=progress,
    )
    console.rule("4/4 score the tuned model")
    load_adapter(model, adapter)
    after = score_generation(model, tokenizer, items, num_beams=args.beams, progress=progress)
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
        f"{before.bleu:.2f} → [bold]{after.bleu:.2f}[/] {format_interval(after.bleu_interval)}",
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
