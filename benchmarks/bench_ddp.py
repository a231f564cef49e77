"""Data-parallel benchmark: a training step of ``alphatune.train`` on 1 process vs 2 (DDP, gloo).

Both runs train the same model on the same global batch (``--batch-size`` examples per optimizer
step; with 2 processes each takes half of every micro-batch) on the same cores: the 1-process run
uses ``--threads`` torch threads, each of the 2 processes ``--threads / 2``. Every process is
started fresh (``torch.multiprocessing``, spawn) with the environment torchrun would give it, and
runs ``train`` for ``--steps`` optimizer steps; a global optimizer-step hook timestamps each step.
The first ``--warmup`` steps are dropped, the median of the rest is reported, with the examples
per second and the speed-up of 2 processes over 1. Only the trained scales are all-reduced: their
bytes per step are reported too.

Data: the first ``--examples`` E2E training pairs (the shared data folder), or made-up pairs
of the same shape where it is absent.

Usage::

    python benchmarks/bench_ddp.py                 # SmolLM2 3-bit (cached base), minutes
    python benchmarks/bench_ddp.py --base runs/base
    python benchmarks/bench_ddp.py --quick         # tiny random Llama: a smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from common import environment, save_results
from rich.console import Console
from rich.table import Table

DEFAULT_OUT = Path(__file__).parent / "results" / "ddp.json"
QUICK_OUT = Path(__file__).parent / "results" / "ddp_quick.json"  # never the real results
PACKAGES = ("torch", "transformers", "alphatune")
TIMEOUT_S = 3600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="quantized base directory")
    parser.add_argument("--batch-size", type=int, default=8, help="global examples per step")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example at most")
    parser.add_argument("--examples", type=int, default=256, help="training pairs to cycle")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.examples = min(args.steps, 5), 1, min(args.examples, 32)
        args.batch_size, args.max_length = min(args.batch_size, 4), min(args.max_length, 64)
    if args.steps <= args.warmup:
        parser.error("--steps must be more than --warmup")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (each of 2 processes takes a share)")
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


def training_examples(count: int) -> tuple[list[Any], str]:
    from alphatune.data import Example, default_file, load_task
    from alphatune.errors import DataError

    try:
        path = default_file("e2e", "train")
    except DataError:
        names = ["Aromi", "Blue Spice", "Cotto", "Zizzi", "The Mill", "Wildwood", "Strada"]
        made_up = [
            Example(
                prompt=f"name[{names[i % 7]}], eatType[pub], food[English], area[riverside]",
                target=f" {names[i % 7]} is a pub near the river that serves English food.",
            )
            for i in range(count)
        ]
        return made_up, "made-up E2E-shaped pairs"
    return load_task("e2e", path, "train", count), f"first {count} of {path}"


def load_model(base: Path | None, quick: bool) -> Any:
    if quick:
        from bases import tiny_quick_base

        return tiny_quick_base()
    from alphatune import load_quantized

    return load_quantized(base)


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, out: Path) -> None:
    """One training process; rank 0 writes its step times to ``out``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(max(1, args.threads // world_size))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from alphatune import TrainConfig, data_parallel, prepare_for_alphatuning, train

    with data_parallel() as parallel:
        model, tokenizer = load_model(args.base, args.quick)
        report = prepare_for_alphatuning(model)
        examples, source = training_examples(args.examples)
        stamps: list[float] = []
        hook = register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
        config = TrainConfig(
            batch_size=args.batch_size,
            max_steps=args.steps,
            max_length=args.max_length,
            checkpoint_every=0,
        )
        began = time.perf_counter()
        train(model, tokenizer, examples, config, progress=False)
        hook.remove()
        if parallel.is_main:
            steps_ms = [(b - a) * 1e3 for a, b in zip([began, *stamps], stamps, strict=False)]
            record = {
                "processes": world_size,
                "threads_per_process": torch.get_num_threads(),
                "trained_values": report.trainable,
                "data": source,
                "steps_ms": steps_ms,
            }
            out.write_text(json.dumps(record))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world_size: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / f"processes-{world_size}.json"
    context = mp.start_processes(
        _worker,
        args=(world_size, free_port(), args, out),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} processes did not finish in {TIMEOUT_S} s")
    record = json.loads(out.read_text())
    timed = record["steps_ms"][args.warmup :]
    step_ms = statistics.median(timed)
    return record | {
        "step_ms": step_ms,
        "step_ms_min": min(timed),
        "examples_per_s": args.batch_size / step_ms * 1e3,
        "allreduced_bytes_per_step": 4 * record["trained_values"] if world_size > 1 else 0,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bases import QUICK_DESCRIPTION, cached_base

    if args.base is None and not args.quick:
        args.base = cached_base(3)
    description = QUICK_DESCRIPTION if args.quick else f"base {args.base}"
    console = Console()
    env = environment(PACKAGES)
    env["threads"] = args.threads  # split between the processes; the parent does not compute
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for world_size in (1, 2):
            console.print(f"{world_size} process(es): {args.steps} steps of {args.batch_size}")
            results.append(run(world_size, args, Path(scratch)))
    one, two = results
    summary = {"speedup": one["step_ms"] / two["step_ms"]}
    save_results(args.out, args, results, env=env, model=description, summary=summary)
    table = Table(title=f"α-tuning step, global batch {args.batch_size}, {description}")
    for column in ("processes", "threads each", "step ms (median)", "examples/s", "all-reduce"):
        table.add_column(column, justify="right")
    for row in results:
        table.add_row(
            str(row["processes"]),
            str(row["threads_per_process"]),
            f"{row['step_ms']:.0f}",
            f"{row['examples_per_s']:.1f}",
            f"{row['allreduced_bytes_per_step'] / 1024:,.0f} KB" if row["processes"] > 1 else "-",
        )
    console.print(table)
    console.print(f"speed-up of 2 processes: {summary['speedup']:.2f}×; saved {args.out}")


if __name__ == "__main__":
    main()
