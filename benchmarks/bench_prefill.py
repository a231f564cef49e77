"""Where a 512-token prefill's time goes in the engine: LUT chunks, dense bf16, dense float32.

The end-to-end figure against transformers and llama.cpp (time to first token) is
``bench_decode.py``'s; this script times the engine's prefill alone (``generate._prefill``, no
head), per path (``ALPHATUNE_PREFILL``: ``lut``, ``bf16``, ``float32``, and bf16 with the
attention in bf16 too, which is not a setting: +0.137% perplexity, ``bench_prefill_precision.py``)
at 1 and 2 threads, and splits the bf16 path's time by operation (torch profiler, plus the
dequantization's numba calls, which the profiler does not see). Run it on a quiet machine.

Usage::

    python benchmarks/bench_prefill.py                  # SmolLM2 3-bit, 512 tokens
    python benchmarks/bench_prefill.py --tokens 24 32 48 64 96 --paths lut bf16 \
        --out benchmarks/results/prefill_threshold.json  # where the dense path starts to pay
    python benchmarks/bench_prefill.py --tokens 48 80 --batch 8 --paths lut bf16 \
        --out benchmarks/results/prefill_batch.json      # a batch of prompts (evaluate's case)
    # A CPU without bfloat16 (AVX2 only), emulated: MKL, oneDNN, OpenBLAS and numba held to
    # AVX2 (NUMBA_CPU_FEATURES: this file's HASWELL_FEATURES); --decoder runtime: NumpyOps.
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell \
        NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=+64bit,+avx,+avx2,+bmi,+bmi2,...  \
        python benchmarks/bench_prefill.py --paths lut float32 --tokens 32 64 128 512 \
        --out benchmarks/results/prefill_float32_avx2.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_table_precision import windows
from common import DECODE_Q3_BASE, CpuWatch, environment, save_watched_results

DEFAULT_OUT = Path(__file__).parent / "results" / "prefill_engine.json"
ISA_LIMITS = (
    "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES",
    "OPENBLAS_CORETYPE", "ALPHATUNE_KERNEL",
)  # fmt: skip
# numba compiles for the host's features unless NUMBA_CPU_FEATURES lists them: Haswell's (AVX2,
# FMA, no AVX-512), for the emulation in the usage above.
HASWELL_FEATURES = (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,+fxsr,+lzcnt,+mmx,+movbe,"
    "+pclmul,+popcnt,+rdrnd,+sahf,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,+xsaveopt"
)
# label -> (ALPHATUNE_PREFILL, attention dtype)
PATHS = {
    "lut": ("lut", torch.float32),
    "bf16": ("bf16", torch.float32),
    "bf16, attention in bf16 too": ("bf16", torch.bfloat16),
    "float32": ("float32", torch.float32),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=DECODE_Q3_BASE, help="a saved quantized base")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--batch", type=int, default=1, help="prompts of --tokens each, at once")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--decoder", choices=("engine", "runtime"), default="engine",
        help="the engine (torch: TorchOps) or the torch-free runtime (NumpyOps)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def time_prefill(engine: Any, prompts: list[list[int]], threads: int, repeats: int) -> list[float]:
    from alphatune_runtime.generate import _prefill

    cache = engine.stack.new_cache(len(prompts), max(len(p) for p in prompts))
    rotary = engine.stack.rotary(cache.max_len)
    sets = np.zeros(len(prompts), np.int64)
    _prefill(engine, prompts, sets, cache, rotary, threads)  # warm-up: compiled code, pages
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        _prefill(engine, prompts, sets, cache, rotary, threads)
        times.append(time.perf_counter() - began)
    return times


def breakdown(engine: Any, ids: list[int], threads: int) -> dict[str, float]:
    """Milliseconds per operation of one bf16 prefill: the profiler's top operations and the
    dequantization (numba, timed around its calls)."""
    from alphatune_runtime import dense_prefill
    from alphatune_runtime.generate import _prefill

    spent = [0.0]
    dequantize = dense_prefill.DensePrefill._dequantize

    def timed(self: Any, *args: Any) -> None:
        began = time.perf_counter()
        dequantize(self, *args)
        spent[0] += time.perf_counter() - began

    cache, rotary = engine.new_cache(1, len(ids)), engine.rotary(len(ids))
    dense_prefill.DensePrefill._dequantize = timed
    try:
        with torch.profiler.profile() as profiler:
            began = time.perf_counter()
            _prefill(engine, [ids], np.zeros(1, np.int64), cache, rotary, threads)
            total = time.perf_counter() - began
    finally:
        dense_prefill.DensePrefill._dequantize = dequantize
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    parts = {e.key: round(e.self_cpu_time_total / 1000, 1) for e in events[:8]}
    return {"total_ms": round(1000 * total, 1), "dequantize_ms": round(1000 * spent[0], 1), **parts}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from alphatune import load_quantized
    from alphatune.engine import Engine

    model, tokenizer = load_quantized(args.base)
    model.eval()
    engine = Engine.build(model)
    decoder = engine
    if args.decoder == "runtime":  # the torch-free runtime on the same base: NumpyOps
        from alphatune_runtime.model import Model

        decoder = Model.load(args.base)
        if set(args.paths) - {"lut", "float32"}:
            raise SystemExit("the runtime prefills through the LUT kernel or float32 GEMMs only")
    [text] = windows(tokenizer, 1, max(args.tokens) * args.batch)
    watch = CpuWatch()
    env = environment(("torch", "numba"))
    # An AVX2-only CPU is emulated by holding the GEMM libraries and numba to AVX2 (see
    # dense_prefill.MIN_FLOAT32_TOKENS): the settings that did it go into the results.
    env["isa_limits"] = {name: os.environ[name] for name in ISA_LIMITS if name in os.environ}
    run = engine.dense.run
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for tokens in args.tokens:
            prompts = [text[i * tokens : (i + 1) * tokens] for i in range(args.batch)]
            for label in args.paths:
                setting, attention = PATHS[label]
                os.environ["ALPHATUNE_PREFILL"] = setting
                engine.dense.run = functools.partial(run, attention_dtype=attention)
                times = time_prefill(decoder, prompts, threads, args.repeats)
                row = {"decoder": args.decoder, "path": label, "threads": threads,
                       "tokens": tokens, "batch": args.batch,
                       "median_s": round(statistics.median(times), 4),
                       "times_s": [round(t, 4) for t in times]}  # fmt: skip
                if label == "bf16" and tokens == max(args.tokens) and decoder is engine:
                    row["breakdown_ms"] = breakdown(engine, prompts[0], threads)
                print(row)
                rows.append(row)
    engine.dense.run = run
    save_watched_results(args.out, args, rows, env=env, watch=watch)


if __name__ == "__main__":
    main()
