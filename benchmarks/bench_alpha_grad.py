"""α-gradient formulations for one BCQ layer, per shape and token count (DESIGN.md section 2).

``BCQMatmul.backward`` can form the scale gradient ``Σ_t dy[t, r] · (B_i x_t)[r, group]`` two ways
(``alphatune.autograd``), with the same FLOPs:

- ``products``: ``B₁x`` per group ``(G, T, out)``, multiply by ``dy``, sum the tokens;
- ``outer``: ``dyᵀx`` (a dense weight-gradient-sized matrix), then ``Σ_group B₁ ⊙ dyᵀx``.

For every layer shape (out x in, group size g) and token count T this times both (the library's
own functions, α₁ only), a dense GEMM of the same FLOPs (``x @ Wᵀ``) for scale, and one forward +
backward of ``BCQLinear`` with the formulation ``choose_alpha_grad`` picks; it reports the bytes
of each formulation's temporaries, whether the rule picked the faster one, and the smallest T/g
from which ``outer`` was never slower. (An earlier run also timed ``products`` with an einsum
instead of multiply-and-sum: 1.8-3.8x slower, so it is no longer measured.)

Codes and scales come from a fast data-free fit; the timings do not depend on their values.

Usage::

    python benchmarks/bench_alpha_grad.py              # SmolLM2-135M shapes + 4096x4096, minutes
    python benchmarks/bench_alpha_grad.py --quick      # one small shape, two token counts
    python benchmarks/bench_alpha_grad.py --tokens 64,1024 --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import environment, save_results, time_ms
from rich.console import Console
from rich.table import Table
from torch import nn

from alphatune import BCQConfig, BCQLinear
from alphatune.autograd import (
    OUTER_MIN_TOKENS_OVER_GROUP,
    AlphaGrad,
    alpha_grad_outer,
    alpha_grad_products,
    choose_alpha_grad,
)
from alphatune.packing import unpack_codes

# out x in / group: SmolLM2-135M's block linears (q/o, k/v, gate/up, down at group_size "auto"),
# one row-wise layer, and a 7B-sized square layer.
DEFAULT_SHAPES = "576x576/144,192x576/144,1536x576/144,576x1536/128,576x576/576,4096x4096/128"
DEFAULT_TOKENS = "16,32,64,96,128,192,256,1024"
DEFAULT_OUT = Path(__file__).parent / "results" / "alpha_grad.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN/GROUP")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts T")
    parser.add_argument("--bits", type=int, default=3, help="code planes q")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument(
        "--budget", type=float, default=2.0, help="seconds per measurement at most (>= 3 runs)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    parser.add_argument("--quick", action="store_true", help="576x576/144 at T=16,256 (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens = "576x576/144", "16,256"
    return args


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        size, _, group = item.strip().lower().partition("/")
        out, _, in_features = size.partition("x")
        shapes.append((int(out), int(in_features), int(group or in_features)))
    return shapes


def measure(
    out: int, in_features: int, group: int, tokens: int, args: argparse.Namespace
) -> dict[str, float | int | str]:
    linear = nn.Linear(in_features, out, bias=False)
    config = BCQConfig(bits=args.bits, group_size=group, method="offset", iterations=1)
    layer = BCQLinear.from_linear(linear, config)
    x = torch.randn(tokens, in_features)
    dy = torch.randn(tokens, out)
    codes = unpack_codes(layer.packed_codes[:1], in_features, dtype=torch.float32)  # α₁'s plane
    dense = layer.dequantize()
    x_grad = x.clone().requires_grad_(True)

    def layer_step() -> None:
        layer(x_grad).backward(dy)

    products_ms = time_ms(
        lambda: alpha_grad_products(x, dy, codes, group), args.repeat, args.budget
    )
    outer_ms = time_ms(lambda: alpha_grad_outer(x, dy, codes, group), args.repeat, args.budget)
    groups = in_features // group
    chosen = choose_alpha_grad(tokens, group)
    faster = AlphaGrad.OUTER if outer_ms < products_ms else AlphaGrad.PRODUCTS
    return {
        "shape": f"{out}x{in_features}",
        "out": out,
        "in": in_features,
        "group": group,
        "tokens": tokens,
        "tokens_over_group": tokens / group,
        "products_ms": products_ms,
        "outer_ms": outer_ms,
        "products_over_outer": products_ms / outer_ms,
        "dense_gemm_ms": time_ms(lambda: x @ dense.T, args.repeat, args.budget),
        "layer_fwd_bwd_ms": time_ms(layer_step, args.repeat, args.budget),
        # float32 temporaries beyond the codes both hold: products (G, T, out) and its product
        # with dy; outer dyᵀx (out, in) and its product with the codes.
        "products_temp_bytes": 2 * 4 * groups * tokens * out,
        "outer_temp_bytes": 2 * 4 * out * in_features,
        "chosen": chosen.value,
        "faster": faster.value,
    }


def never_slower_from(rows: list[dict]) -> float | None:
    """Smallest measured T/g from which ``outer`` was at least as fast at every larger T/g."""
    ratios = sorted({r["tokens_over_group"] for r in rows})
    for ratio in ratios:
        if all(r["outer_ms"] <= r["products_ms"] for r in rows if r["tokens_over_group"] >= ratio):
            return ratio
    return None


def print_table(rows: list[dict]) -> None:
    table = Table(title="α₁ gradient: median ms (lower is better)")
    for name in [
        "out x in",
        "g",
        "T",
        "T/g",
        "products",
        "outer",
        "prod/outer",
        "gemm",
        "layer f+b",
        "prod MB",
        "outer MB",
        "chosen",
        "ok",
    ]:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(
            r["shape"],
            str(r["group"]),
            str(r["tokens"]),
            f"{r['tokens_over_group']:.2f}",
            f"{r['products_ms']:.3f}",
            f"{r['outer_ms']:.3f}",
            f"{r['products_over_outer']:.2f}",
            f"{r['dense_gemm_ms']:.3f}",
            f"{r['layer_fwd_bwd_ms']:.2f}",
            f"{r['products_temp_bytes'] / 1e6:.1f}",
            f"{r['outer_temp_bytes'] / 1e6:.1f}",
            r["chosen"],
            "yes" if r["chosen"] == r["faster"] else "no",
        )
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(("torch",))  # before the run: its load is not in the average
    torch.manual_seed(0)
    console = Console()
    rows = []
    for out, in_features, group in parse_shapes(args.shapes):
        for tokens in [int(t) for t in args.tokens.split(",")]:
            row = measure(out, in_features, group, tokens, args)
            console.log(
                f"{out}x{in_features}/{group} T={tokens}: products {row['products_ms']:.3f} ms, "
                f"outer {row['outer_ms']:.3f} ms"
            )
            rows.append(row)
    print_table(rows)
    rule = {
        "outer_min_tokens_over_group": OUTER_MIN_TOKENS_OVER_GROUP,
        "outer_never_slower_from_tokens_over_group": never_slower_from(rows),
        "chose_faster": sum(r["chosen"] == r["faster"] for r in rows),
        "measured": len(rows),
        # When the rule picked the slower one: how much slower (chosen / faster time).
        "worst_miss": max(
            max(r["products_over_outer"], 1 / r["products_over_outer"])
            for r in rows
            if r["chosen"] != r["faster"]
        )
        if any(r["chosen"] != r["faster"] for r in rows)
        else 1.0,
    }
    console.print(f"rule: {rule}")
    save_results(args.out, args, rows, env=env, rule=rule)
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
