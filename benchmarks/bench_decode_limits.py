"""What limits engine decode here: memory traffic of the LUT kernel, and engine variants A/B.

Two measurements, one results file (``benchmarks/results/decode_limits.json``); run it on a quiet
machine (the training grid paused): this VM's run-to-run spread is about ±10%.

- ``layers``: the decode kernel (``kernels.decode_kernel()``, through its numba entry, no Python
  between calls) on ``--layers`` distinct random 3-bit layers of SmolLM2's MLP shape (1536 x 576,
  0.4 MB of codes and scales each; 120 of them, 49 MB, exceed the last-level cache), cycled, against
  one of them repeated (cache-resident); microseconds per call and the GB/s of codes and scales
  that makes, at 1 and 2 threads. Out-of-cache GB/s close to in-cache means the kernel is
  compute-bound; far below, memory-bound.
- ``engine``: batch-1 greedy decode of ``--new-tokens`` tokens on a saved 3-bit base through
  ``alphatune.engine`` in variants (the kernel's table precision, the work from which a
  projection runs on two threads), each in a fresh process, the variants alternating for
  ``--rounds`` rounds so that drifts of the machine hit them alike; tokens/s is the best of 3 runs
  in each process.

Usage::

    python benchmarks/bench_decode_limits.py                 # both parts
    python benchmarks/bench_decode_limits.py --part layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import DECODE_Q3_BASE, CpuWatch, environment, save_watched_results

DEFAULT_OUT = Path(__file__).parent / "results" / "decode_limits.json"
DEFAULT_BASE = DECODE_Q3_BASE
PROMPT = "Write a short story about a robot who learns to paint."
SHAPE = (1536, 576, 144)  # out, in, group size: SmolLM2's gate/up projections
# name -> (ALPHATUNE_KERNEL, min_parallel_work or None for the kernel's own)
VARIANTS = {
    "float32 tables": ("avx2", None),
    "int8 tables": ("avx2-int8", None),
    "float32, more layers on 2 threads": ("avx2", 1 << 17),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["layers", "engine", "both"], default="both")
    parser.add_argument("--layers", type=int, default=120, help="distinct layers cycled")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="a saved 3-bit base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--engine-worker", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ layers
def layer_traffic(n_layers: int) -> list[dict[str, Any]]:
    from alphatune.kernels import decode_kernel, lut_common
    from alphatune.kernels.numba_threads import numba_threads

    kernel = decode_kernel()
    if kernel is None:
        raise SystemExit("no LUT kernel runs here (numba, and AVX2 + FMA or AVX-512F, needed)")
    out, inp, group = SHAPE
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(n_layers):
        packed = torch.randint(0, 256, (3, out, inp // 8), dtype=torch.uint8, generator=generator)
        alpha = torch.rand(3, out, inp // group, generator=generator)
        layers.append(
            lut_common.layer_operands(
                kernel.module.prepare_codes(packed, inp),
                kernel.module.prepare_scales(alpha[:1], alpha[1:]),
                None,
                group,
                kernel.module.ROWS,
                kernel.module.SCALES_LAYOUT,
            )
        )
    layer_bytes = sum(a.nbytes for a in (layers[0].codes, layers[0].first, layers[0].rest))
    x = np.random.default_rng(0).standard_normal((1, inp)).astype(np.float32)
    sets = np.zeros(1, np.int64)
    decode = kernel.native.module.decode_native

    def call(layer: Any, parallel: bool) -> None:
        # AVX-512 takes a flag; AVX2 its table_bits and the thread count (numba's, set below).
        extra = (
            (parallel,) if kernel.name == "avx512" else (kernel.table_bits, 2 if parallel else 1)
        )
        decode(
            x, group, layer.codes, layer.first, layer.rest, sets, layer.offset, False,
            layer.n_groups, layer.bytes_per_group, *extra,
        )  # fmt: skip

    def per_call_us(order: list[int], parallel: bool, repeats: int = 3) -> float:
        began = time.perf_counter()
        for _ in range(repeats):
            for index in order:
                call(layers[index], parallel)
        return (time.perf_counter() - began) / (repeats * len(order)) * 1e6

    results = []
    for threads in (1, 2):
        with numba_threads(threads):
            parallel = threads > 1
            per_call_us(list(range(n_layers)), parallel, 1)  # compile, fault in
            cycled = min(per_call_us(list(range(n_layers)), parallel) for _ in range(3))
            repeated = min(per_call_us([0] * n_layers, parallel) for _ in range(3))
        for where, us in (("out of cache (cycled)", cycled), ("in cache (one repeated)", repeated)):
            results.append(
                {
                    "part": "layers",
                    "kernel": kernel.name,
                    "threads": threads,
                    "weights": where,
                    "us_per_call": round(us, 1),
                    "gb_per_s": round(layer_bytes / us / 1e3, 2),
                    "layer_bytes": layer_bytes,
                    "layers": n_layers,
                }
            )
            print(results[-1], flush=True)
    return results


# ------------------------------------------------------------------------------ engine
def engine_worker(base: str, kernel: str, min_work: str) -> None:
    """One variant in this process: prints ``{"tok_s": [...]}`` per thread count."""
    import dataclasses

    os.environ["ALPHATUNE_KERNEL"] = kernel
    from alphatune import load_quantized
    from alphatune.engine import Engine, generate_ids

    model, tokenizer = load_quantized(base)
    engine = Engine.build(model)
    if min_work != "default":
        engine = dataclasses.replace(engine, min_parallel_work=int(min_work))
    ids = tokenizer(PROMPT)["input_ids"]
    new_tokens = int(os.environ["BENCH_NEW_TOKENS"])
    speeds = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        generate_ids(engine, [ids], max_new_tokens=8)
        times = []
        for _ in range(3):
            began = time.perf_counter()
            generate_ids(engine, [ids], max_new_tokens=new_tokens)
            times.append(time.perf_counter() - began)
        speeds[threads] = round(new_tokens / min(times), 1)
    print(json.dumps(speeds))


def engine_variants(base: Path, rounds: int, new_tokens: int) -> list[dict[str, Any]]:
    if not base.is_dir():
        raise SystemExit(f"{base} is not a saved base; run benchmarks/bench_decode.py once first")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, (kernel, min_work) in VARIANTS.items():
            done = subprocess.run(
                [sys.executable, __file__, "--engine-worker", str(base), kernel,
                 "default" if min_work is None else str(min_work)],
                capture_output=True, text=True, check=True,
                env={**os.environ, "BENCH_NEW_TOKENS": str(new_tokens)},
            )  # fmt: skip
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    results = []
    for name, (kernel, min_work) in VARIANTS.items():
        for threads in ("1", "2"):
            speeds = [run[threads] for run in runs[name]]
            results.append(
                {
                    "part": "engine",
                    "variant": name,
                    "kernel": kernel,
                    "min_parallel_work": min_work,
                    "threads": int(threads),
                    "tok_s_per_round": speeds,
                    "tok_s_median": float(np.median(speeds)),
                }
            )
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.engine_worker:
        engine_worker(*args.engine_worker)
        return
    watch = CpuWatch()
    env = environment(("torch", "numba", "transformers"))
    results: list[dict[str, Any]] = []
    if args.part in ("layers", "both"):
        results += layer_traffic(args.layers)
    if args.part in ("engine", "both"):
        results += engine_variants(args.base, args.rounds, args.new_tokens)
    save_watched_results(args.out, args, results, env=env, watch=watch)


if __name__ == "__main__":
    main()
