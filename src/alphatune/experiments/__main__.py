"""``python -m alphatune.experiments``: run the comparison grid, one run, or list where it stands.

    python -m alphatune.experiments grid [--phase e2e ...] [--threads 1]   # resumable, background
    python -m alphatune.experiments list                                   # done / pending / todo
    python -m alphatune.experiments run --task e2e --method lora --lr 1e-3 --steps 2 ...
    python -m alphatune.experiments rescore [--task webnlg]                # scores from predictions
    python -m alphatune.experiments bases                                  # the bases' perplexity
    alphatune report                                 # docs/results.md and its plots from the files

Each grid run goes to a fresh process (``run-spec``), so one failure or leak cannot touch the
next; a failed run leaves ``<run id>.error.txt`` beside where its result would be and is skipped
until ``--retry-failed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

from alphatune.experiments import grid as grid_module
from alphatune.experiments.spec import Budget, RunSpec, result_path, work_path
from alphatune.experiments.tasks import TASKS
from alphatune.models import cache_dir

DEFAULT_RESULTS = Path("benchmarks/results/paper")


def _error_path(results: Path, spec: RunSpec) -> Path:
    return result_path(results, spec).with_suffix(".error.txt")


def next_spec(results: Path, work: Path, phases: tuple[str, ...], retry: bool) -> RunSpec | None:
    """The first run of the grid that is not done, not failed (unless ``retry``) and not running."""
    from alphatune.experiments.runner import running

    for item in grid_module.specs(results, phases):
        if isinstance(item, str) or result_path(results, item).exists():
            continue
        if _error_path(results, item).exists() and not retry:
            continue
        if running(work_path(work, item)):
            continue
        return item
    return None


def _next(args: argparse.Namespace) -> int:
    spec = next_spec(
        args.results, args.work, tuple(args.phase or grid_module.ORDER), args.retry_failed
    )
    print(json.dumps(spec.to_dict()) if spec else "")
    return 0


def _global_options(args: argparse.Namespace) -> list[str]:
    return ["--results", str(args.results), "--work", str(args.work)]


def _run_grid(args: argparse.Namespace) -> int:
    """Run the grid's pending runs one after another, each in a fresh process.

    The next run is chosen by a fresh process too (``next``), so each choice sees the result
    files written so far (a family's learning rate, once its search is done). Both processes
    import the code they find on the path: ``benchmarks/paper_grid.sh`` pins it to a worktree at
    the commit it started from, so a grid picks up new code only when started again.
    """
    module = [sys.executable, "-m", "alphatune.experiments", *_global_options(args)]
    phases = [f"--phase={p}" for p in args.phase or ()]
    ran = 0
    while args.max_runs is None or ran < args.max_runs:
        retry = ["--retry-failed"] if args.retry_failed else []
        chosen = subprocess.run(
            [*module, "next", *phases, *retry], check=True, capture_output=True, text=True
        ).stdout.strip()
        if not chosen:
            print("nothing left to run (see: list)", flush=True)
            return 0
        item = RunSpec.from_dict(json.loads(chosen))
        print(f"[{time.strftime('%H:%M:%S')}] {item.task}/{item.run_id}", flush=True)
        began = time.time()
        finished = subprocess.run(
            [*module, "run-spec", chosen, "--threads", str(args.threads)],
            check=False,
            capture_output=True,
            text=True,
        )
        error = _error_path(args.results, item)
        if finished.returncode != 0:
            error.parent.mkdir(parents=True, exist_ok=True)
            error.write_text(finished.stdout[-5000:] + finished.stderr[-20000:])
            print(f"  failed (exit {finished.returncode}); see {error}", flush=True)
        else:
            error.unlink(missing_ok=True)
            print(f"  done in {time.time() - began:.0f} s", flush=True)
        ran += 1
    return 0


def _run_spec(args: argparse.Namespace) -> int:
    from alphatune.experiments.runner import run

    torch.set_num_threads(args.threads)
    spec = RunSpec.from_dict(json.loads(args.spec))
    result = run(spec, args.results, args.work)
    print(json.dumps(result["scores"]))
    return 0


def _run_one(args: argparse.Namespace) -> int:
    from alphatune.experiments.runner import run

    torch.set_num_threads(args.threads)
    budget = Budget(
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
        eval_limit=args.eval_limit,
    )
    options = tuple(
        (k, json.loads(v) if v in ("true", "false") else v)
        for k, v in (o.split("=", 1) for o in args.option)
    )
    if args.task in grid_module.BUDGETS:  # another budget than the grid's: files of its own
        budget = grid_module.tagged_budget(args.task, args.split, budget)
    spec = RunSpec(
        args.task, args.method, args.bits, args.seed, args.lr, args.split, options, budget
    )
    result = run(spec, args.results, args.work, progress=True)
    print(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=1))
    return 0


def _list(args: argparse.Namespace) -> int:
    from alphatune.experiments.runner import running

    for item in grid_module.specs(args.results, tuple(args.phase or grid_module.ORDER)):
        if isinstance(item, str):
            print(f"pending  {item}")
            continue
        state = "done" if result_path(args.results, item).exists() else "todo"
        if state == "todo" and running(work_path(args.work, item)):
            state = "running"
        elif state == "todo" and _error_path(args.results, item).exists():
            state = "FAILED"
        print(f"{state:8} {item.task}/{item.run_id}")
    return 0


def _rescore(args: argparse.Namespace) -> int:
    from alphatune.experiments.runner import rescore

    tasks = args.task or ["*"]
    for path in sorted(p for task in tasks for p in args.results.glob(f"{task}/*.json")):
        rescore(path)
        print(f"rescored {path}")
    return 0


def _bases(args: argparse.Namespace) -> int:
    from alphatune.experiments.bases import measure_bases
    from alphatune.models import DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    data = measure_bases(args.results, args.model or DEFAULT_MODEL)
    print(f"{len(data['bases'])} entries in {args.results / 'bases.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alphatune.experiments")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--work", type=Path, default=cache_dir() / "paper" / "runs")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grid", help="run every pending run of the grid, most important first")
    g.add_argument("--phase", action="append", choices=list(grid_module.PHASES))
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--max-runs", type=int, default=None)
    g.add_argument("--retry-failed", action="store_true")
    g.set_defaults(func=_run_grid)
    n = sub.add_parser("next", help=argparse.SUPPRESS)
    n.add_argument("--phase", action="append", choices=list(grid_module.PHASES))
    n.add_argument("--retry-failed", action="store_true")
    n.set_defaults(func=_next)
    s = sub.add_parser("run-spec", help=argparse.SUPPRESS)
    s.add_argument("spec")
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(func=_run_spec)
    o = sub.add_parser("run", help="one run with explicit settings")
    o.add_argument("--task", required=True)
    o.add_argument("--method", required=True)
    o.add_argument("--bits", type=int, default=None)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--lr", type=float, required=True)
    o.add_argument("--split", default="test", choices=("dev", "test"))
    o.add_argument("--option", action="append", default=[], help="name=value (method option)")
    o.add_argument("--steps", type=int, default=300)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--max-length", type=int, default=128)
    o.add_argument("--beams", type=int, default=1)
    o.add_argument("--max-new-tokens", type=int, default=64)
    o.add_argument("--eval-limit", type=int, default=None)
    o.add_argument("--threads", type=int, default=1)
    o.set_defaults(func=_run_one)
    ls = sub.add_parser("list", help="every run of the grid: done, todo, failed or pending")
    ls.add_argument("--phase", action="append", choices=list(grid_module.PHASES))
    ls.set_defaults(func=_list)
    r = sub.add_parser("rescore", help="recompute every result's scores from its predictions")
    r.add_argument(
        "--task",
        action="append",
        choices=sorted(TASKS),  # an unknown name is an error, not an empty glob
        help="only this task's results (repeatable; default: all)",
    )
    r.set_defaults(func=_rescore)
    b = sub.add_parser("bases", help="WikiText-2 perplexity of every cached base, once each")
    b.add_argument("--model", default=None, help="the unquantized model (default: the grid's)")
    b.add_argument("--threads", type=int, default=1)
    b.set_defaults(func=_bases)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
