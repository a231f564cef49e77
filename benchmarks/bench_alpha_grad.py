"""α-gradient formulations for one BCQ layer, side by side (DESIGN.md section 2).

Times, per shape, one forward + backward of ``BCQLinear`` as shipped, and the three ways to get the
α₁ gradient from ``dy`` and ``x``:

- ``products+einsum``: ``B₁x`` per group, then an einsum with ``dy``;
- ``products+mul-sum`` (what ``BCQMatmul`` uses): ``B₁x`` per group, multiply by ``dy``, sum tokens;
- ``outer``: ``G = dyᵀx`` (a dense weight-gradient-sized matrix), then ``Σ_group B₁ ⊙ G``.

    .venv/bin/python benchmarks/bench_alpha_grad.py [--tokens 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from alphatune import BCQConfig, BCQLinear
from alphatune.kernels import binary_products
from alphatune.packing import unpack_codes

SHAPES = [(1536, 576, 144), (576, 1536, 128), (576, 576, 144), (4096, 4096, 128)]


def timed(fn, repeat: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - began) / repeat * 1e3


def measure(out: int, inp: int, group: int, tokens: int, repeat: int) -> dict[str, float | str | int]:
    layer = BCQLinear.from_linear(nn.Linear(inp, out, bias=False),
                                  BCQConfig(bits=3, group_size=group, method="offset", iterations=1))
    x = torch.randn(tokens, inp, requires_grad=True)
    dy = torch.randn(tokens, out)
    codes = unpack_codes(layer.packed_codes[:1], inp, dtype=torch.float32)
    dense = layer.dequantize()

    def layer_step() -> None:
        layer(x).backward(dy)

    def einsum() -> None:
        torch.einsum("pgto,to->pog", binary_products(x.detach(), codes, group), dy)

    def mul_sum() -> None:
        (binary_products(x.detach(), codes, group) * dy).sum(2)

    def outer() -> None:
        grad = dy.T @ x.detach()
        (grad.view(out, -1, group) * codes[0].view(out, -1, group)).sum(-1)

    return {"shape": f"{out}x{inp}", "group": group, "tokens": tokens,
            "layer_fwd_bwd_ms": timed(layer_step, repeat),
            "products_einsum_ms": timed(einsum, repeat),
            "products_mul_sum_ms": timed(mul_sum, repeat),
            "outer_ms": timed(outer, repeat),
            "dense_gemm_ms": timed(lambda: x.detach() @ dense.T, repeat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "alpha_grad.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(out, inp, group, args.tokens, args.repeat) for out, inp, group in SHAPES]
    for row in rows:
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    for row in rows:
        row["threads"] = args.threads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
