"""Time to quantize SmolLM2-135M at 3 bits with the default (calibrated) method, and its quality.

Issue 15's target: under 60 s, perplexity within 1% of before. One run quantizes the embedded
model with ``BCQConfig(bits=3)`` (every other setting at its default) on ``--calibration-sequences``
× 512 tokens of WikiText-2 *valid*, then measures WikiText-2 test perplexity (first 8,192 tokens,
context 512). The entry is stored under ``--label`` in one JSON file, with the commit of the
alphatune that was imported, so an older tree can be measured by the same script:

    .venv/bin/python benchmarks/bench_quantize_speed.py --label now
    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/bench_quantize_speed.py --label before

``--draws 3`` quantizes three times on disjoint calibration windows and records the perplexity's
mean and spread: the same code gave 44.67 on an AVX2 EPYC and 44.11 on an AVX-512 Xeon from
draw 0 (float order alone), and 43.13-44.13 over three draws on one machine, so a change is
judged on the mean over draws, not on one quantization.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from common import CpuWatch, environment

import alphatune
from alphatune import BCQConfig, quantize_
from alphatune.calibration import HESSIAN_PRECISIONS, resolve_hessian_precision
from alphatune.data import calibration_batch, find_data_dir, load_text_tokens
from alphatune.evaluate import perplexity
from alphatune.models import load_model, load_tokenizer

RESULTS = Path(__file__).parent / "results" / "quantize_speed.json"
EVAL_TOKENS = 8192


def imported_commit() -> str | None:
    """The commit of the alphatune source this process imported (``-dirty`` if changed)."""
    source = Path(alphatune.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=source, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def calibration_draws(tokenizer, path: Path, sequences: int, draws: int) -> list[torch.Tensor]:
    """``draws`` disjoint calibration sets of ``sequences`` x 512 tokens: consecutive slices of
    one ``calibration_batch`` of ``sequences * draws`` rows, so draw 0 is exactly the default
    calibration (``quantize``'s) and draw d the d-th window after it."""
    return list(calibration_batch(tokenizer, path, sequences * draws, 512).split(sequences))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of this entry in the results file")
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument(
        "--draws",
        type=int,
        default=1,
        help="quantize this many times, each on its own calibration window of WikiText-2 valid "
        "(draw 0 = the default calibration): the perplexity of one quantization moves by a few "
        "percent with float order alone, so a quality claim compares means over draws",
    )
    parser.add_argument(
        "--first-draw",
        type=int,
        default=0,
        help="start at this draw (windows before it are skipped): more draws for a comparison "
        "whose first ones are already measured, under another label",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-sequential",
        action="store_true",
        help="every layer's statistics from the unquantized model in one pass (quantize_'s "
        "sequential=False), instead of block by block on the quantized blocks' outputs",
    )
    parser.add_argument(
        "--hessian-precision",
        choices=HESSIAN_PRECISIONS,
        default="auto",
        help="quantize_'s hessian_precision (auto: bfloat16 inputs on a CPU with native bf16)",
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="BCQConfig.iterations (default: its own)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.draws < 1 or args.first_draw < 0:
        parser.error(f"--draws must be >= 1 and --first-draw >= 0, got {args.draws} and "
                     f"{args.first_draw}")  # fmt: skip
    commit = imported_commit()  # now: the tree may change while the draws run
    torch.set_num_threads(args.threads)
    data = find_data_dir()
    tokenizer = load_tokenizer()
    draws = calibration_draws(
        tokenizer,
        data / "wikitext-2" / "valid.txt",
        args.calibration_sequences,
        args.first_draw + args.draws,
    )[args.first_draw :]
    eval_tokens = load_text_tokens(
        tokenizer, data / "wikitext-2" / "test.txt", max_tokens=EVAL_TOKENS
    )
    env = environment(("torch", "transformers", "numba"))
    config = (
        BCQConfig(bits=3)
        if args.iterations is None
        else BCQConfig(bits=3, iterations=args.iterations)
    )
    runs = []
    for draw, calibration in enumerate(draws, start=args.first_draw):
        model = load_model()
        watch = CpuWatch()  # a draw's seconds count only when nothing else ran beside it
        began = time.perf_counter()
        summary = quantize_(
            model,
            config,
            calibration=calibration,
            sequential=not args.no_sequential,
            hessian_precision=args.hessian_precision,
        )
        seconds = time.perf_counter() - began
        others = watch.stop()
        runs.append(
            {
                "draw": draw,
                "seconds": round(seconds, 1),
                "others_cpu_share": round(others.cpu_share, 3),
                "busy": others.busy,
                "perplexity": perplexity(model, eval_tokens, progress=False),
            }
        )
        print(f"{args.label} draw {draw}: {runs[-1]}", flush=True)
    entry = {
        "commit": commit,
        "environment": env,
        "config": config.to_dict(),
        "calibration": [args.calibration_sequences, 512],
        "sequential": not args.no_sequential,
        "hessian_precision": args.hessian_precision,
        "hessian_precision_resolved": resolve_hessian_precision(
            args.hessian_precision, torch.device("cpu")
        ),
        "first_draw": args.first_draw,
        "eval_tokens": EVAL_TOKENS,
        "bits_per_weight": summary.bits_per_weight,
        "model_bytes": summary.model_bytes,
    }
    if args.first_draw == 0:
        # Draw 0's figures under the old keys: entries from before draws compare with them.
        entry.update(seconds=runs[0]["seconds"], perplexity=runs[0]["perplexity"],
                     busy=runs[0]["busy"])  # fmt: skip
    entry["draws"] = runs  # always: an entry of one draw d > 0 kept none of its numbers before
    if len(runs) > 1:
        values = [r["perplexity"] for r in runs]
        entry["perplexity_mean"] = statistics.mean(values)
        entry["perplexity_stdev"] = statistics.stdev(values)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    mean = statistics.mean(r["perplexity"] for r in runs)
    seconds = ", ".join(f"{r['seconds']:.1f}" for r in runs)
    print(f"{args.label}: {seconds} s, perplexity {mean:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
