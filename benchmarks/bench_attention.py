"""Can the engine's float32 prefill attention get cheaper through torch? SmolLM2's shape.

The dense prefill (``alphatune/engine/prefill.py``) runs attention in float32: in bf16 it costs
+0.137% perplexity, over the project's 0.1% rule (``bench_prefill_precision.py``). At 512 tokens
that attention is ~30% of the prefill (``bench_prefill.py``'s breakdown). This times one layer's
causal attention (9 query heads, 3 key/value heads, head size 64) on one thread, exact in float32
every way: torch's ``scaled_dot_product_attention`` (its CPU flash kernel), the same with the
key/value heads repeated, a grouped GEMM + softmax + GEMM over the whole square, and that in
causal chunks (the query rows of chunk i only against keys up to its end); bf16 SDPA for scale,
and SDPA and the grouped GEMMs under oneDNN's bf16 math mode (bf16 inputs, float32 sums: not
exact, the quantizer's recording pass uses it).
The tensors have the engine's layouts (the values a strided view of their projection's output).
Each exact way must match the first within 1e-5. Run it on a quiet machine.

    python benchmarks/bench_attention.py     # -> benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from common import CpuWatch, environment, save_watched_results

from alphatune.calibration import recording_precision

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
DEFAULT_OUT = Path(__file__).parent / "results" / "attention.json"


def grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int) -> torch.Tensor:
    """Causal attention of ``q (H, T, d)`` over ``k, v (KV, T, d)`` as batched GEMMs per group
    of query heads sharing a key/value head, in ``chunks`` causal row blocks."""
    tokens = q.shape[1]
    groups = q.view(KV_HEADS, HEADS // KV_HEADS, tokens, HEAD_DIM)
    out = torch.empty_like(groups)
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)
    edges = [round(i * tokens / chunks) for i in range(chunks + 1)]
    for start, end in pairwise(edges):
        scores = groups[:, :, start:end] @ k[:, None, :end].transpose(-1, -2) * HEAD_DIM**-0.5
        scores += mask[start:end, :end]
        out[:, :, start:end] = torch.softmax(scores, -1) @ v[:, None, :end]
    return out.view(HEADS, tokens, HEAD_DIM)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                          enable_gqa=True)[0]  # fmt: skip


def bf16_math(run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()`` with oneDNN's float32 GEMMs taking bfloat16 inputs (float32 accumulation and
    output): the quantizer's Hessian-recording pass's own setting."""
    with recording_precision("bfloat16"):
        return run()


def median_ms(run: Callable[[], torch.Tensor], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    env = environment(("torch",))  # before the run: its own load is not in the average
    generator = torch.Generator().manual_seed(0)
    # As the engine holds them (prefill.py, since 2ab1429): q rotated into (heads, T, d), the
    # keys and values read from the KV cache's (kv heads, T, d), each contiguous.
    q = torch.randn(HEADS, args.tokens, HEAD_DIM, generator=generator)
    k = torch.randn(KV_HEADS, args.tokens, HEAD_DIM, generator=generator)
    v = torch.randn(KV_HEADS, args.tokens, HEAD_DIM, generator=generator)
    repeat = HEADS // KV_HEADS
    ways: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa float32 (the engine's)": lambda: F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, enable_gqa=True
        )[0],
        "sdpa float32, key/value heads repeated": lambda: F.scaled_dot_product_attention(
            q[None],
            k.repeat_interleave(repeat, 0)[None],
            v.repeat_interleave(repeat, 0)[None],
            is_causal=True,
        )[0],
        **{
            f"grouped GEMMs, {c} causal chunk{'s' if c > 1 else ''}": (
                lambda c=c: grouped(q, k, v, c)
            )
            for c in (1, 2, 4, 8)
        },
        **{
            f"{name}, oneDNN bf16 math mode (not exact: bf16 inputs, float32 sums)": (
                lambda run=run: bf16_math(run)
            )
            for name, run in (
                ("sdpa float32", lambda: sdpa(q, k, v)),
                ("grouped GEMMs, 4 causal chunks", lambda: grouped(q, k, v, 4)),
                ("grouped GEMMs, 1 causal chunk", lambda: grouped(q, k, v, 1)),
            )
        },
        **{
            f"sdpa {name} (not exact: for scale)": (
                lambda dtype=dtype: F.scaled_dot_product_attention(
                    q.to(dtype)[None],
                    k.to(dtype)[None],
                    v.to(dtype)[None],
                    is_causal=True,
                    enable_gqa=True,
                )[0].float()
            )
            for name, dtype in (("bf16", torch.bfloat16), ("float16", torch.float16))
        },
    }
    watch = CpuWatch()
    reference = next(iter(ways.values()))()
    results = []
    for name, run in ways.items():
        error = float((run() - reference).abs().max())
        if "not exact" not in name and error > 1e-5:
            raise AssertionError(f"{name} is not exact: max |difference| {error:.1e}")
        results.append(
            {"way": name, "tokens": args.tokens, "median_ms": round(median_ms(run, args.repeats), 3),
             "max_abs_difference": error}
        )  # fmt: skip
        print(f"{name}: {results[-1]['median_ms']:.2f} ms (max |diff| {error:.1e})")
    save_watched_results(args.out, args, results, env=env, watch=watch)


if __name__ == "__main__":
    main()
