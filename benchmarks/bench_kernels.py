"""Kernel benchmark: BCQ kernels vs dense torch matmuls (and bitsandbytes NF4), side by side.

For every shape (out x in), bit width, batch and thread count it times the decode path

- ``lut``:  the LUT kernel's ``decoder`` on the layout a layer keeps (tables built per call):
  by default the one decode uses on this CPU (``kernels.lut_kernel()``: AVX-512, else AVX2);
  ``--kernel`` names others (``avx512``, ``avx2``, ``avx2-int16``, ``avx2-int8``), one row each, so the AVX2
  kernel can be measured on an AVX-512 machine too,
- ``fp32``: ``F.linear`` with a dense float32 weight,
- ``bf16``: ``F.linear`` with a dense bfloat16 weight and bfloat16 activations,
- ``nf4``:  bitsandbytes ``matmul_4bit`` on an NF4 weight (when bitsandbytes runs on this CPU),

and the batched path (prefill / training, ``--prefill`` tokens):

- ``batched``: ``kernels.dequantized_linear`` (numba dequantization + ``F.linear``: what layers do for
  many tokens),
- ``ref``:     the torch reference dequantization + ``F.linear`` (dequantize-then-matmul),
- ``fp32_prefill``: ``F.linear`` with the dense weight for the same tokens.

It reports median milliseconds, ``lut / fp32``, and the memory-bandwidth bound of the LUT kernel:
the bytes it must read (packed codes + scales + activations) divided by the copy bandwidth measured
on this machine with the same thread count (a large torch tensor copy, read + write bytes).

Codes and scales are random: the speed of these kernels does not depend on their values.

Usage::

    python benchmarks/bench_kernels.py             # full grid, a few minutes
    python benchmarks/bench_kernels.py --quick     # 4096x4096, 3 bits, batch 1: a smoke run
    python benchmarks/bench_kernels.py --shapes 4096x4096 --bits 2,4 --batch 1 --threads 1
    python benchmarks/bench_kernels.py --kernel avx2,avx2-int8 --shapes 576x576,1536x576,576x1536
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from common import environment, save_results, time_ms
from rich.console import Console
from rich.table import Table
from torch import Tensor

from alphatune import kernels
from alphatune.kernels import avx2_lut, avx512_lut
from alphatune.kernels.reference import bcq_matmul_dequant
from alphatune.packing import packed_width

DEFAULT_SHAPES = "2048x2048,4096x4096,4096x11008,11008x4096"
DEFAULT_OUT = Path(__file__).parent / "results" / "kernels.json"
# LUT kernels by name: the module and the extra arguments of its lut_matmul.
LUT_KERNELS: dict[str, tuple[ModuleType, tuple[object, ...]]] = {
    "avx512": (avx512_lut, ()),
    "avx2": (avx2_lut, (torch.float32,)),
    "avx2-int16": (avx2_lut, (torch.int16,)),
    "avx2-int8": (avx2_lut, (torch.int8,)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN shapes")
    parser.add_argument("--bits", default="2,3,4", help="comma-separated bit widths q")
    parser.add_argument("--batch", default="1,8", help="comma-separated token counts")
    parser.add_argument("--threads", default="1,all", help="comma-separated thread counts or 'all'")
    parser.add_argument("--group-size", type=int, default=128, help="inputs per scale group")
    parser.add_argument(
        "--kernel",
        default="auto",
        help="comma-separated LUT kernels to time: auto (what decode uses here), "
        + ", ".join(LUT_KERNELS),
    )
    parser.add_argument(
        "--prefill", type=int, default=256, help="tokens for the batched path (0: skip it)"
    )
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per kernel (median)")
    parser.add_argument(
        "--budget", type=float, default=1.0, help="seconds per kernel at most (at least 3 runs)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    parser.add_argument("--quick", action="store_true", help="one shape, q=3, batch 1 (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.bits, args.batch, args.prefill = "4096x4096", "3", "1", 64
    return args


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        out, _, in_features = item.strip().lower().partition("x")
        shapes.append((int(out), int(in_features)))
    return shapes


def parse_threads(text: str) -> list[int]:
    available = os.cpu_count() or 1
    counts = [available if item.strip() == "all" else int(item) for item in text.split(",")]
    return sorted(set(counts))


def copy_bandwidth_gbs(megabytes: int = 256, repeat: int = 5) -> float:
    """Read + write bandwidth of a large tensor copy (GB/s) with the current torch threads."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeat, budget_s=2.0)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def lut_bytes(bits: int, out: int, in_features: int, groups: int, batch: int) -> int:
    """Bytes the LUT kernel must read: codes, float32 scales, float32 activations."""
    return (
        bits * out * packed_width(in_features) + 4 * bits * out * groups + 4 * batch * in_features
    )


def nf4_linear(weight: Tensor) -> Callable[[Tensor], Tensor] | str:
    """bitsandbytes NF4 ``x -> x Wᵀ`` on CPU, or the reason it cannot run here."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        probe = torch.randn(1, weight.shape[1])
        bnb.matmul_4bit(probe, packed.t(), quant_state=state)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return f"{type(exc).__name__}: {exc}"[:200]
    return lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)


def parse_kernels(text: str) -> list[str]:
    """Kernel names to time; ``auto`` is the one decode uses on this CPU."""
    names = []
    for item in text.split(","):
        name = item.strip().lower()
        if name == "auto":
            name = kernels.lut_kernel() or ""
            if not name:
                raise SystemExit(
                    "no LUT kernel runs here: it needs numba (pip install numba) and an AVX2 or "
                    "AVX-512 CPU"
                )
        if name not in LUT_KERNELS:
            raise SystemExit(f"unknown kernel {name!r}; choose from auto, {', '.join(LUT_KERNELS)}")
        if not LUT_KERNELS[name][0].available():
            raise SystemExit(f"the {name} kernel cannot run on this CPU (or numba is missing)")
        if name not in names:
            names.append(name)
    return names


def run(args: argparse.Namespace) -> list[dict]:
    lut_kernels = parse_kernels(args.kernel)
    console = Console()
    results = []
    generator = torch.Generator().manual_seed(0)
    for threads in parse_threads(args.threads):
        torch.set_num_threads(threads)
        bandwidth = copy_bandwidth_gbs()
        console.log(f"threads={threads}: copy bandwidth {bandwidth:.1f} GB/s")
        for out, in_features in parse_shapes(args.shapes):
            group_size = args.group_size if in_features % args.group_size == 0 else in_features
            groups = in_features // group_size
            weight = torch.randn(out, in_features, generator=generator) / in_features**0.5
            weight_bf16 = weight.to(torch.bfloat16)
            nf4 = nf4_linear(weight)
            prefill = torch.randn(args.prefill, in_features, generator=generator)
            fp32_prefill_ms = (
                time_ms(partial(F.linear, prefill, weight), 3, args.budget)
                if args.prefill
                else None
            )
            for bits in [int(q) for q in args.bits.split(",")]:
                packed = torch.randint(
                    0,
                    256,
                    (bits, out, packed_width(in_features)),
                    dtype=torch.uint8,
                    generator=generator,
                )
                alpha = torch.rand(bits, out, groups, generator=generator)
                layouts = {}
                for name in lut_kernels:
                    module, extra = LUT_KERNELS[name]
                    codes = module.prepare_codes(packed, in_features)
                    scales = module.prepare_scales(alpha[:1], alpha[1:])
                    layouts[name] = (module, codes, scales, extra)
                batched_ms = ref_ms = None
                if args.prefill:
                    operands = (prefill, packed, alpha, None, group_size, in_features)
                    batched_ms = time_ms(
                        partial(kernels.dequantized_linear, *operands), 3, args.budget
                    )
                    # The torch reference dequantization takes 0.1-2 s: two runs, no warm-up.
                    ref_ms = time_ms(
                        partial(bcq_matmul_dequant, *operands), 2, args.budget, warmup=False
                    )
                for batch in [int(b) for b in args.batch.split(",")]:
                    x = torch.randn(batch, in_features, generator=generator)
                    fp32_ms = time_ms(partial(F.linear, x, weight), args.repeat, args.budget)
                    bf16_ms = time_ms(
                        partial(F.linear, x.to(torch.bfloat16), weight_bf16),
                        args.repeat,
                        args.budget,
                    )
                    nf4_ms = (
                        time_ms(partial(nf4, x), args.repeat, args.budget)
                        if callable(nf4)
                        else None
                    )
                    nbytes = lut_bytes(bits, out, in_features, groups, batch)
                    bound_ms = nbytes / (bandwidth * 1e9) * 1e3
                    for name, (module, codes, scales, extra) in layouts.items():
                        # What a layer keeps and calls: the decoder, its checks done once.
                        decode = module.decoder(codes, scales, None, group_size, *extra)
                        lut_ms = time_ms(partial(decode, x, None), args.repeat, args.budget)
                        row = {
                            "kernel": name,
                            "out": out,
                            "in": in_features,
                            "bits": bits,
                            "group_size": group_size,
                            "batch": batch,
                            "threads": threads,
                            "lut_ms": lut_ms,
                            "fp32_ms": fp32_ms,
                            "bf16_ms": bf16_ms,
                            "nf4_ms": nf4_ms,
                            "nf4_unavailable": None if callable(nf4) else nf4,
                            "lut_over_fp32": lut_ms / fp32_ms,
                            "lut_over_bf16": lut_ms / bf16_ms,
                            "lut_bytes": nbytes,
                            "bandwidth_gbs": bandwidth,
                            "bound_ms": bound_ms,
                            "bound_over_fp32": bound_ms / fp32_ms,
                            "lut_over_bound": lut_ms / bound_ms,
                            "prefill_tokens": args.prefill,
                            "batched_ms": batched_ms,
                            "ref_dequant_ms": ref_ms,
                            "fp32_prefill_ms": fp32_prefill_ms,
                        }
                        results.append(row)
                        console.log(
                            f"{name} {out}x{in_features} q={bits} T={batch} threads={threads}: "
                            f"lut {lut_ms:.3f} ms, fp32 {fp32_ms:.3f} ms "
                            f"({lut_ms / fp32_ms:.2f}x), bf16 {bf16_ms:.3f} ms"
                        )
    return results


def _ms(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[dict]) -> None:
    table = Table(title="BCQ kernels: median ms (lower is better)")
    columns = ["kernel", "out x in", "q", "T", "thr", "lut", "fp32", "bf16", "nf4", "lut/fp32"]
    columns += ["lut/bf16", "bound/fp32"]
    columns += ["batched", "ref deq", "fp32 pre"]
    for name in columns:
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            r["kernel"],
            f"{r['out']}x{r['in']}",
            str(r["bits"]),
            str(r["batch"]),
            str(r["threads"]),
            _ms(r["lut_ms"]),
            _ms(r["fp32_ms"]),
            _ms(r["bf16_ms"]),
            _ms(r["nf4_ms"]),
            f"{r['lut_over_fp32']:.2f}",
            f"{r['lut_over_bf16']:.2f}",
            f"{r['bound_over_fp32']:.2f}",
            _ms(r["batched_ms"], 1),
            _ms(r["ref_dequant_ms"], 1),
            _ms(r["fp32_prefill_ms"], 1),
        )
    Console(width=180).print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment(("torch", "numba"))
    results = run(args)
    print_table(results)
    import numba  # run() has checked that a LUT kernel, hence numba, is available

    env["numba_threads_max"] = numba.config.NUMBA_NUM_THREADS
    save_results(args.out, args, results, env=env)
    Console().print(f"saved {args.out}")


if __name__ == "__main__":
    main()
