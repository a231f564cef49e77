"""Quantization sweep on the embedded SmolLM2: perplexity, bits per weight and time per method.

For every (method, bits, group size) it loads the fp32 model, quantizes it, and measures WikiText-2
test perplexity on a fixed slice. Results are appended to a JSONL file as they come (a killed run
resumes where it stopped) and rendered as a markdown table.

    .venv/bin/python benchmarks/bench_quantization.py                 # the full sweep (hours)
    .venv/bin/python benchmarks/bench_quantization.py --bits 3 --methods calibrated --group-sizes auto
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from pathlib import Path

from common import append_record, environment, load_records, measured_on

from alphatune import BCQConfig, quantize_
from alphatune.data import calibration_batch, find_data_dir, load_text_tokens
from alphatune.evaluate import perplexity
from alphatune.models import load_model, load_tokenizer

RESULTS = Path(__file__).parent / "results" / "quantization.jsonl"
DOCS = Path(__file__).parents[1] / "docs" / "quantization.md"


def parse_group(text: str) -> int | str | None:
    return None if text == "row" else text if text == "auto" else int(text)


def key(record: dict) -> tuple:
    return (record["method"], record["bits"], str(record["group_size"]), record.get("sequential"))


def render(records: list[dict], settings: dict) -> str:
    fp = next((r for r in records if r["method"] == "fp32"), None)
    lines = [
        "# Quantization quality on SmolLM2-135M-Instruct",
        "",
        (
            "WikiText-2 test perplexity (first "
            f"{settings['eval_tokens']:,} tokens, context 512) after quantizing the 210 linear layers of the "
            "30 blocks, no fine-tuning. `calibrated` uses "
            f"{settings['calibration_sequences']}×512 tokens of WikiText-2 *valid*. Bits per weight count "
            "codes + fp16 scales + fp16 offsets. `auto` groups are 144 inputs for 576-wide layers and 128 "
            "for 1536-wide ones. Caveat (MODELS.md): the fp32 model is itself a Q4_1 (4-bit, groups of 32) "
            "dequantization, so 4 bits at group 32 flatters any method."
        ),
        "",
        f"Reproduce: `{settings['command']}` (results in `benchmarks/results/quantization.jsonl`).",
        "",
    ]
    if fp:
        lines += [f"Unquantized fp32: **{fp['perplexity']:.2f}**.", ""]
    lines += [
        "| method | bits | group | sequential | bits/weight | perplexity | × fp32 | quantize time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"greedy": 0, "alternating": 1, "offset": 2, "calibrated": 3}
    rows = sorted(
        (r for r in records if r["method"] != "fp32"),
        key=lambda r: (order.get(r["method"], 9), r["bits"], str(r["group_size"])),
    )
    for r in rows:
        ratio = r["perplexity"] / fp["perplexity"] if fp else float("nan")
        ppl = f"{r['perplexity']:.1f}" if r["perplexity"] < 1e5 else f"{r['perplexity']:.2e}"
        seq = "yes" if r.get("sequential") else ("no" if r["method"] == "calibrated" else "")
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['group_size'] or 'row'} | {seq} | "
            f"{r['bits_per_weight']:.2f} | {ppl} | {ratio:.2f}× | {r['seconds']:.0f} |"
        )
    lines += ["", measured_on(records), ""]
    # Hand-written findings live on their own page: this one is rewritten on every record.
    lines += [
        "How many bits to choose, and which calibration text: [choosing.md](choosing.md).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=["greedy", "alternating", "offset", "calibrated"]
    )
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--group-sizes", nargs="+", default=["row", "auto", "32"])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--one-pass", action="store_true", help="calibrate without sequential mode")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--render", action="store_true", help="only re-render --docs")
    args = parser.parse_args()
    settings = {
        "eval_tokens": args.eval_tokens,
        "calibration_sequences": args.calibration_sequences,
        "command": "make bench  # or .venv/bin/python benchmarks/bench_quantization.py",
    }
    if args.render:
        args.docs.write_text(render(load_records(args.out), settings))
        return

    data = find_data_dir()
    tokenizer = load_tokenizer()
    eval_tokens = load_text_tokens(
        tokenizer, data / "wikitext-2" / "test.txt", max_tokens=args.eval_tokens
    )
    calibration = calibration_batch(
        tokenizer, data / "wikitext-2" / "valid.txt", args.calibration_sequences, 512
    )
    records = load_records(args.out)
    done = {key(r) for r in records}

    def record(entry: dict) -> None:
        append_record(records, entry, args.out, args.docs, partial(render, settings=settings))

    if ("fp32", 32, "None", None) not in done:
        model = load_model()
        record(
            {
                "method": "fp32",
                "bits": 32,
                "group_size": None,
                "sequential": None,
                "perplexity": perplexity(model, eval_tokens, progress=False),
                "bits_per_weight": 32.0,
                "seconds": 0.0,
                "environment": environment(("torch", "transformers")),
            }
        )
    for method in args.methods:
        for bits in args.bits:
            for group in args.group_sizes:
                sequential = (not args.one_pass) if method == "calibrated" else None
                entry_key = (method, bits, str(parse_group(group)), sequential)
                if entry_key in done:
                    continue
                model = load_model()
                config = BCQConfig(bits=bits, group_size=parse_group(group), method=method)
                env = environment(("torch", "transformers", "numba"))
                began = time.perf_counter()
                summary = quantize_(
                    model, config, calibration=calibration, sequential=bool(sequential)
                )
                seconds = time.perf_counter() - began
                value = perplexity(model, eval_tokens, progress=False)
                record(
                    {
                        "method": method,
                        "bits": bits,
                        "group_size": parse_group(group),
                        "sequential": sequential,
                        "perplexity": value if math.isfinite(value) else 1e30,
                        "bits_per_weight": summary.bits_per_weight,
                        "seconds": seconds,
                        "eval_tokens": args.eval_tokens,
                        "environment": env,
                    }
                )


if __name__ == "__main__":
    main()
