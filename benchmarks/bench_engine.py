"""Decode engine vs transformers generate on the 3-bit SmolLM2 (issue 15, item 1).

One process, side by side in the same run: for each ``--threads`` count and each ``--head``, batch
1 greedy generation of exactly ``--new-tokens`` tokens from a fixed prompt through

- ``fp32``: the unquantized model, transformers ``generate`` (skip with ``--no-fp32``);
- ``q3-transformers``: the quantized base, transformers ``generate`` (the reference path);
- ``q3-engine``: the same base through ``alphatune.engine`` (eos ignored, so the count is exact);

tokens/s = new tokens / wall time (prefill of the short prompt included, as in
``bench_generation.py``), median of ``--repeats`` after one warm-up. For the engine it also splits
a decode step into its parts, in microseconds per token: the embedding lookup, the native call
(and, inside it, the 210 projections alone, timed by a numba loop with no attention or norms),
the LM head, and the choice of the token. The results file records the commit, versions, machine
and load average: on a busy machine compare the rows of one run, not absolute numbers.

Usage::

    python benchmarks/bench_engine.py                       # threads 1 and 2, the saved head
    python benchmarks/bench_engine.py --head saved compact  # also with the compact head
    python benchmarks/bench_engine.py --quick               # tiny random Llama: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import environment, save_results

DEFAULT_BASE = Path.home() / ".cache/alphatune/paper/bases/smollm2-135m-instruct-calibrated-q3"
DEFAULT_OUT = Path(__file__).parent / "results" / "engine.json"
PROMPT = "The history of the city begins in the Roman period, when"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="a saved quantized base")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--head", nargs="+", default=["saved"], help="saved, bf16 or compact")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 model")
    parser.add_argument("--quick", action="store_true", help="tiny random model, few tokens")
    parser.add_argument("--note", default="", help="saved with the results (e.g. 'machine busy')")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def git_commit() -> str:
    """HEAD, with ``+dirty`` when the working tree differs from it."""

    def run(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout

    commit = run("rev-parse", "HEAD").strip()
    return commit + (
        "+dirty" if run("status", "--porcelain", "--untracked-files=no").strip() else ""
    )


def load_models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(quantized base, tokenizer, fp32 model or None)."""
    if args.quick:
        import sys

        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from tiny_models import make_tiny_llama

        from alphatune import BCQConfig, quantize_
        from alphatune.models import load_tokenizer

        tokenizer = load_tokenizer()
        fp32 = make_tiny_llama(len(tokenizer))
        model = make_tiny_llama(len(tokenizer))
        quantize_(model, BCQConfig(bits=3, group_size=32, method="offset"))
        return model.eval(), tokenizer, None if args.no_fp32 else fp32
    from alphatune.bases import load_quantized
    from alphatune.models import load_model, load_tokenizer

    model, tokenizer = load_quantized(args.base)
    tokenizer = tokenizer or load_tokenizer()
    return model.eval(), tokenizer, None if args.no_fp32 else load_model()


def set_head(model: Any, head: str) -> str:
    """Give the base the requested head (``saved``: as loaded); returns the head module's type."""
    if head != "saved":
        from alphatune import BCQConfig
        from alphatune.lm_head import quantize_lm_head

        quantize_lm_head(model, BCQConfig(method="offset", lm_head=head))
    return type(model.get_output_embeddings()).__name__


def transformers_tokens(model: Any, ids: list[int], new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def engine_tokens(engine: Any, ids: list[int], new_tokens: int) -> list[int]:
    from alphatune.engine import generate_ids

    return generate_ids(engine, [ids], max_new_tokens=new_tokens)[0].tokens


def tokens_per_second(
    run: Any, new_tokens: int, repeats: int, threads: int
) -> tuple[float, list[int]]:
    torch.set_num_threads(threads)
    run(8)  # warm-up: numba loads its cache, transformers builds its kernels' layouts
    times, tokens = [], []
    for _ in range(repeats):
        # Again before every run: a numba parallel call can reset torch's count (OpenMP).
        torch.set_num_threads(threads)
        began = time.perf_counter()
        tokens = run(new_tokens)
        times.append(time.perf_counter() - began)
    return new_tokens / statistics.median(times), tokens


def step_breakdown(engine: Any, ids: list[int], threads: int, steps: int = 48) -> dict[str, float]:
    """Microseconds per decode token of each part of an engine step (batch 1)."""
    from alphatune.engine import Sampling, choose_tokens

    cache = engine.new_cache(1, len(ids) + steps + 1)
    rotary = engine.rotary(cache.max_len)
    zeros = np.zeros(len(ids), np.int64)
    torch.set_num_threads(threads)
    hidden = engine.forward(
        np.asarray(ids, np.int64), zeros, np.arange(len(ids)), zeros, cache, rotary, threads
    )
    parts = {"embed": 0.0, "native": 0.0, "head": 0.0, "choose": 0.0}
    token, position = np.array([ids[-1]], np.int64), len(ids)
    one = np.zeros(1, np.int64)
    for _ in range(steps):
        t0 = time.perf_counter()
        embedded = engine.embed(token)
        t1 = time.perf_counter()
        positions = np.array([position])
        hidden = engine.run_blocks(embedded, one, positions, one, cache, rotary, threads)
        t2 = time.perf_counter()
        logits = engine.logits(hidden)
        t3 = time.perf_counter()
        token = choose_tokens(logits, Sampling(), None)
        t4 = time.perf_counter()
        position += 1
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[name] += seconds
    breakdown = {name: 1e6 * total / steps for name, total in parts.items()}
    breakdown["projections_only"] = projections_only_us(engine, threads)
    # What the native call spends outside the projections: norms, rotary, attention, SiLU, copies.
    breakdown["native_other"] = breakdown["native"] - breakdown["projections_only"]
    return breakdown


def projections_only_us(engine: Any, threads: int, repeats: int = 20) -> float:
    """Microseconds for the 210 projections of one token, in one numba loop (kernels alone, on
    ``threads`` threads as the engine runs them: each shared input's tables built once, one
    parallel region per group)."""
    from numba import njit

    from alphatune.kernels.numba_threads import numba_threads
    from alphatune_runtime import native

    groups = native.SHARED_INPUTS
    per_block = len(native.PROJECTIONS)

    @njit
    def run_all(tag, inputs, w_codes, biases, ints, threads, min_work, repeats):
        sets = np.zeros(1, np.int64)
        for _ in range(repeats):
            for block in range(ints.shape[0] // per_block):
                for first, count in groups:  # as forward_tokens: one input's tables per group
                    index = block * per_block + first
                    x = inputs[: ints[index, native.N_BYTES] * 8].reshape((1, -1)).copy()
                    outputs = [
                        np.empty((1, ints[index + p, native.OUT_FEATURES]), np.float32)
                        for p in range(count)
                    ]
                    native._project_group(
                        tag, x, index, count, w_codes, biases, ints, sets, sets, threads,
                        min_work, outputs,
                    )  # fmt: skip

    w, stack = engine.weights, engine.stack
    inputs = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
    args = (stack.kernel_tag, inputs, w.codes, w.biases, w.ints, threads, stack.min_parallel_work)
    with numba_threads(threads):
        run_all(*args, 1)
        began = time.perf_counter()
        run_all(*args, repeats)
    return 1e6 * (time.perf_counter() - began) / repeats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = min(args.new_tokens, 16), 1
    model, tokenizer, fp32 = load_models(args)
    ids = tokenizer.encode(PROMPT)
    from alphatune.engine import Engine

    results: list[dict[str, Any]] = []
    env: dict[str, Any] = {}
    for head in args.head:
        head_type = set_head(model, head)
        began = time.perf_counter()
        engine = Engine.build(model)
        build_s = time.perf_counter() - began
        for threads in args.threads:
            torch.set_num_threads(threads)
            env = environment(("torch", "transformers", "numba", "tokenizers"))
            reference_tps, reference = tokens_per_second(
                lambda n: transformers_tokens(model, ids, n), args.new_tokens, args.repeats, threads
            )
            engine_tps, ours = tokens_per_second(
                lambda n, e=engine: engine_tokens(e, ids, n), args.new_tokens, args.repeats, threads
            )
            row: dict[str, Any] = {
                "head": head,
                "head_module": head_type,
                "threads": threads,
                "kernel": engine.kernel_name,
                "engine_build_s": round(build_s, 3),
                "transformers_tok_s": round(reference_tps, 2),
                "engine_tok_s": round(engine_tps, 2),
                "engine_vs_transformers": round(engine_tps / reference_tps, 2),
                "tokens_equal_transformers": sum(
                    1 for _ in zip(ours, reference, strict=False) if _[0] == _[1]
                ),
                "leading_tokens_equal": next(
                    (i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b),
                    min(len(ours), len(reference)),
                ),
                "load_average": env["load_average"],
                "engine_step_us": {
                    k: round(v, 1) for k, v in step_breakdown(engine, ids, threads).items()
                },
            }
            if fp32 is not None:
                fp32_tps, _ = tokens_per_second(
                    lambda n: transformers_tokens(fp32, ids, n),
                    args.new_tokens,
                    args.repeats,
                    threads,
                )
                row["fp32_tok_s"] = round(fp32_tps, 2)
                row["engine_vs_fp32"] = round(engine_tps / fp32_tps, 2)
                row["transformers_q3_vs_fp32"] = round(reference_tps / fp32_tps, 2)
            print(row, flush=True)
            results.append(row)
    env.update(commit=git_commit(), note=args.note, base=str(args.base), prompt=PROMPT)
    save_results(args.out, args, results, env=env)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
