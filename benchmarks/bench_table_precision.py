"""What the AVX2 kernel's integer tables (int16, int8) cost in quality, against its float32 tables.

The decode engine on a saved 3-bit base, teacher-forced over windows of WikiText-2's test text
(``engine.prompt_logits``: every position through the LUT kernel), once with each table
precision (``ALPHATUNE_KERNEL=avx2``, ``avx2-int16`` and ``avx2-int8``): the perplexity of each,
the relative change, and at how many positions the integer tables pick another top token than the
float32 ones, with the float32 logits' top-2 margin at those positions (a flip where the margin
is tiny is a near-tie, not an error). The project's rule for a lossy default is < 0.1% perplexity
(docs/lm_head.md). Results: ``benchmarks/results/table_precision.json``.

Usage::

    python benchmarks/bench_table_precision.py                 # 8 windows of 512 tokens
    python benchmarks/bench_table_precision.py --windows 2     # a quick look
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import DECODE_Q3_BASE, CpuWatch, environment, save_watched_results

DEFAULT_OUT = Path(__file__).parent / "results" / "table_precision.json"
DEFAULT_BASE = DECODE_Q3_BASE
EXACT = "avx2"  # float32 tables: exact up to summation order
KERNELS = (EXACT, "avx2-int16", "avx2-int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="a saved quantized base")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def windows(tokenizer: Any, count: int, context: int) -> list[list[int]]:
    from alphatune.data.locate import find_data_dir

    text = (find_data_dir() / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    ids = tokenizer(text[: 400 * context * count])["input_ids"]
    if len(ids) < count * context:
        raise SystemExit(f"only {len(ids)} tokens of text for {count} windows of {context}")
    return [ids[i * context : (i + 1) * context] for i in range(count)]


def compare(
    kernel: str,
    approx: torch.Tensor,
    exact: torch.Tensor,
    margins: torch.Tensor,
    nll: dict[str, float],
    exact_name: str = EXACT,
) -> dict[str, Any]:
    """How ``kernel``'s logits differ from the float32 tables' (``exact``, ``nll[exact_name]``)
    over all positions."""
    flipped = exact.argmax(-1) != approx.argmax(-1)
    flip_margins = margins[flipped]
    return {
        "kernel": kernel,
        "positions": int(exact.shape[0]),
        "perplexity": {k: round(math.exp(nll[k]), 4) for k in (exact_name, kernel)},
        "perplexity_change": round(math.exp(nll[kernel] - nll[exact_name]) - 1, 6),
        "top1_flips": int(flipped.sum()),
        "flip_margin_max": round(float(flip_margins.max()), 4) if flipped.any() else None,
        "flip_margin_median": round(float(flip_margins.median()), 4) if flipped.any() else None,
        "positions_with_margin_below_max_flip": (
            int((margins <= flip_margins.max()).sum()) if flipped.any() else 0
        ),
        "logit_error_rms": round(float((approx - exact).pow(2).mean().sqrt()), 5),
        "logit_rms": round(float(exact.pow(2).mean().sqrt()), 3),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from alphatune import load_quantized
    from alphatune.engine import Engine
    from alphatune_runtime.generate import prompt_logits

    torch.set_num_threads(1)
    model, tokenizer = load_quantized(args.base)
    texts = windows(tokenizer, args.windows, args.context)
    watch = CpuWatch()
    env = environment(("torch", "numba", "transformers"))
    logits: dict[str, list[torch.Tensor]] = {}
    for kernel in KERNELS:
        os.environ["ALPHATUNE_KERNEL"] = kernel
        engine = Engine.build(model)
        logits[kernel] = [torch.from_numpy(prompt_logits(engine, window))[:-1] for window in texts]
        print(f"{kernel}: {args.windows} windows done", flush=True)
    targets = torch.cat([torch.tensor(w[1:]) for w in texts])
    nll = {
        kernel: F.cross_entropy(torch.cat(logits[kernel]), targets, reduction="mean").item()
        for kernel in KERNELS
    }
    exact = torch.cat(logits[EXACT])
    top2 = exact.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    results = [
        compare(kernel, torch.cat(logits[kernel]), exact, margins, nll)
        for kernel in KERNELS
        if kernel != EXACT
    ]
    for row in results:
        print(row)
    save_watched_results(args.out, args, results, env=env, watch=watch)


if __name__ == "__main__":
    main()
