"""Render the tables of docs/performance.md from the saved benchmark results.

Every number in that page comes from a JSON file under benchmarks/results/, written by the
benchmark named next to its table; this script only formats them, so the page can be rebuilt
after any rerun::

    python benchmarks/render_performance.py            # prints the tables (markdown)
    python benchmarks/render_performance.py --write    # puts them into docs/performance.md
    python benchmarks/render_performance.py --check    # fails if a results file is missing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from revision import changed_since

RESULTS = Path(__file__).parent / "results"
PAGE = Path(__file__).parent.parent / "docs" / "performance.md"
START, END = "<!-- tables:start -->", "<!-- tables:end -->"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = [_row(header), _row(["---"] * len(header))]
    return "\n".join(lines + [_row(r) for r in rows])


def kernels_table(data: dict) -> str:
    """Decode (LUT) vs fp32 / bf16 / NF4 per shape, q, batch and threads; ratios from one run."""
    rows = []
    for r in data["results"]:
        nf4 = "-" if r["nf4_ms"] is None else f"{r['nf4_ms']:.2f}"
        rows.append(
            [
                f"{r['out']}×{r['in']}",
                r["bits"],
                r["batch"],
                r["threads"],
                f"{r['lut_ms']:.3f}",
                f"{r['fp32_ms']:.3f}",
                f"{r['bf16_ms']:.3f}",
                nf4,
                f"**{r['lut_over_fp32']:.2f}×**",
                f"{r['bound_over_fp32']:.2f}×",
            ]
        )
    header = ["out×in", "q", "T", "threads", "ours ms", "fp32 ms", "bf16 ms", "NF4 ms"]
    return _table(header + ["ours/fp32", "bound/fp32"], rows)


def batched_table(data: dict) -> str:
    """The batched path (prefill / training): numba dequantize + GEMM vs torch dequantize + GEMM."""
    seen, rows = set(), []
    for r in data["results"]:
        key = (r["out"], r["in"], r["bits"], r["threads"])
        if key in seen or r["batched_ms"] is None:
            continue
        seen.add(key)
        rows.append(
            [
                f"{r['out']}×{r['in']}",
                r["bits"],
                r["threads"],
                r["prefill_tokens"],
                f"{r['batched_ms']:.1f}",
                f"{r['ref_dequant_ms']:.1f}",
                f"{r['fp32_prefill_ms']:.1f}",
                f"**{r['ref_dequant_ms'] / r['batched_ms']:.1f}×**",
                f"{r['batched_ms'] / r['fp32_prefill_ms']:.2f}×",
            ]
        )
    header = ["out×in", "q", "threads", "T", "ours ms", "torch deq+GEMM ms", "fp32 GEMM ms"]
    return _table(header + ["speed-up vs torch deq", "ours/fp32"], rows)


def generation_table(data: dict) -> str:
    """Model-level decode tokens/s, prefill tokens/s and peak memory per config and threads."""
    rows = []
    for config in data["results"]:
        if "error" in config:
            rows.append([config["name"], "-", config["error"][:80], "", "", "", "", ""])
            continue
        for run in config["runs"]:
            rows.append(
                [
                    config["name"],
                    run["threads"],
                    f"{run['decode_tokens_per_s']:.1f}",
                    f"**{run['decode_vs_fp32']:.2f}×**",
                    f"{run['prefill_tokens_per_s']:.0f}",
                    f"{run['prefill_vs_fp32']:.2f}×",
                    f"{config['peak_rss'] / 2**20:.0f}",
                    f"{run['agree_with_fp32']}/{run['new_tokens']}",
                ]
            )
    header = ["config", "threads", "decode tok/s", "vs fp32", "prefill tok/s", "vs fp32"]
    return _table(header + ["peak RSS MB", "tokens = fp32"], rows)


def training_table(data: dict) -> str:
    rows = [
        [
            r["config"],
            f"{r['trainable_params']:,}",
            f"{r['step_s']:.2f}",
            f"{min(r['step_times_s']):.2f}",
            f"{r['peak_rss_steps_mb']:.0f}",
        ]
        for r in data["results"]
    ]
    ratio = data["alphatune_over_lora"]
    rows.append(
        [
            "ours / LoRA",
            f"{ratio['trainable_params']:.2f}×",
            f"**{ratio['step_s']:.2f}×**",
            "",
            f"{ratio['peak_rss_steps_mb']:.2f}×",
        ]
    )
    return _table(["config", "trainable", "step s (median)", "step s (min)", "peak RSS MB"], rows)


def mixed_table(data: dict) -> str:
    rows = [
        [
            r["target"],
            r["phase"],
            f"{r['single_ms']:.3f}",
            f"{r['mixed_ms']:.3f}",
            f"**{r['overhead_pct']:+.1f}%**",
        ]
        for r in data["results"]
    ]
    return _table(["target", "phase", "single-task ms", "mixed (4 adapters) ms", "overhead"], rows)


# results file (#table) -> (title, renderer, the script and code it measures). A table is marked
# stale when a commit after the one it measured changed any of those paths.
_KERNELS = ("src/alphatune/kernels", "src/alphatune/packing.py")
# The whole inference and training path; not the paper harness or the command line.
_MODEL = (
    "src/alphatune",
    "src/alphatune_runtime",
    ":(exclude)src/alphatune/experiments",
    ":(exclude)src/alphatune/cli",
)
SECTIONS = {
    "kernels.json": (
        "Layer level: decode",
        kernels_table,
        ("benchmarks/bench_kernels.py", *_KERNELS),
    ),
    "kernels.json#batched": (
        "Layer level: batched path",
        batched_table,
        ("benchmarks/bench_kernels.py", *_KERNELS),
    ),
    "generation.json": (
        "Model level: SmolLM2 generation",
        generation_table,
        ("benchmarks/bench_generation.py", *_MODEL),
    ),
    "training.json": ("Training step", training_table, ("benchmarks/bench_training.py", *_MODEL)),
    "mixed.json": ("Mixed-task batches", mixed_table, ("benchmarks/bench_mixed.py", *_MODEL)),
}


def provenance(name: str, data: dict, measured: tuple[str, ...]) -> str:
    """Where a table comes from, and whether the code it measures changed since."""
    env = data.get("environment", {})
    commit = env.get("commit")
    line = f"(from `benchmarks/results/{name}`, {env.get('date', '?')}"
    line += f", commit {commit[:8]})" if commit else ")"
    changed = changed_since(commit, measured)
    script = measured[0]
    if changed is None:
        reason = "it records no commit" if not commit else f"git does not know commit {commit[:8]}"
        return f"{line}\n\n**Stale**: {reason}, so it may predate the code; rerun `{script}`."
    if env.get("dirty") or commit.endswith("+dirty"):
        return (
            f"{line}\n\n**Stale**: measured with uncommitted changes to the code, so no commit "
            f"holds what it measured; rerun `{script}` on a clean tree."
        )
    if changed:
        shown = ", ".join(changed[:5]) + (", …" if len(changed) > 5 else "")
        return (
            f"{line}\n\n**Stale**: {len(changed)} later commit{'s' if len(changed) > 1 else ''} "
            "changed what it measures "
            f"({shown}); rerun `{script}`."
        )
    return line


def render(check: bool = False) -> str:
    """All tables as markdown; ``check`` raises if a results file is missing."""
    parts, missing = [], []
    for key, (title, render_table, measured) in SECTIONS.items():
        name = key.split("#")[0]
        data = _load(name)
        if data is None:
            missing.append(name)
            continue
        source = provenance(name, data, measured)
        parts.append(f"### {title}\n\n{source}\n\n{render_table(data)}\n")
    if missing and check:
        raise SystemExit(f"missing results: {', '.join(missing)}")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a results file is missing")
    parser.add_argument("--write", action="store_true", help=f"replace the tables in {PAGE}")
    args = parser.parse_args()
    tables = render(args.check)
    if not args.write:
        print(tables)
        return
    page = PAGE.read_text()
    if START not in page or END not in page:
        raise SystemExit(f"{PAGE} has no {START} ... {END} block to replace")
    head, rest = page.split(START, 1)
    tail = rest.split(END, 1)[1]
    PAGE.write_text(f"{head}{START}\n\n{tables}\n{END}{tail}")
    print(f"wrote the tables into {PAGE}")


if __name__ == "__main__":
    main()
