"""LM head options on SmolLM2: WikiText-2 perplexity with the head kept, in bf16, or as BCQ.

For the unquantized fp32 model and for cached calibrated bases (``bases.py``), it replaces the head
as each ``--heads`` entry says (``keep``, ``bf16``, ``bcqN``: N-bit calibrated BCQ, group "auto")
and measures WikiText-2 *test* perplexity with the protocol of ``bench_quantization.py`` (first
8,192 tokens, context 512). BCQ heads are calibrated on the head inputs of 32×512 tokens of
WikiText-2 *valid*, collected once per base. Results are appended to a JSONL file as they come (a
killed run resumes where it stopped) and rendered as a markdown table.

    .venv/bin/python benchmarks/bench_lm_head.py                       # fp32 and 3-bit bases
    .venv/bin/python benchmarks/bench_lm_head.py --bases 4 --heads keep bf16 bcq4
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
from bases import DEFAULT_CACHE, base_config, cached_base, calibration_tokens
from common import append_record, describe_machine, load_records

from alphatune import quantize_lm_head
from alphatune.adapters import load_quantized
from alphatune.data import load_text_tokens
from alphatune.evaluate import perplexity
from alphatune.lm_head import collect_head_hessian
from alphatune.models import load_model, load_tokenizer
from alphatune.quantize import summarize
from alphatune.workflow import find_data_dir

RESULTS = Path(__file__).parent / "results" / "lm_head.jsonl"
DOCS = Path(__file__).parents[1] / "docs" / "lm_head.md"
COMMAND = ".venv/bin/python benchmarks/bench_lm_head.py"


def render(records: list[dict], settings: dict) -> str:
    lines = [
        "# LM head options on SmolLM2-135M-Instruct",
        "",
        (
            "WikiText-2 test perplexity (first "
            f"{settings['eval_tokens']:,} tokens, context 512) with the LM head kept (fp32, tied "
            "to the embedding), as a bf16 copy, or as N-bit BCQ (calibrated, group 144, "
            f"{settings['calibration_sequences']}×512 tokens of WikiText-2 *valid*). `q3` is the "
            "3-bit calibrated base of `bench_quantization.py` (blocks only). The head is 28.3M "
            "of the model's 134.5M parameters; a replaced head is untied, so the fp32 embedding "
            "stays for the lookup (it is read one row per token). *head MB* is the head as "
            "stored."
        ),
        "",
        f"Reproduce: `{settings['command']}` (results in `benchmarks/results/lm_head.jsonl`).",
        "",
        "| base | head | head MB | perplexity | × keep |",
        "|---|---|---|---|---|",
    ]
    keep = {r["base"]: r["perplexity"] for r in records if r["head"] == "keep"}
    for r in records:
        ratio = r["perplexity"] / keep[r["base"]] if r["base"] in keep else float("nan")
        lines.append(
            f"| {r['base']} | {r['head']} | {r['head_bytes'] / 1e6:.1f} | "
            f"{r['perplexity']:.3f} | {ratio:.4f}× |"
        )
    lines += [
        "",
        f"Machine: {describe_machine()}.",
        "",
    ]
    return "\n".join(lines)


def head_bytes(model: torch.nn.Module) -> int:
    """Bytes of the head as stored: a replaced head's own, else the (tied) fp32 weight."""
    summary = summarize(model)
    if summary.lm_head_bytes:
        return summary.lm_head_bytes
    weight = model.get_output_embeddings().weight
    return weight.numel() * weight.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["fp32", "3"], help="fp32 and/or bit widths")
    parser.add_argument("--heads", nargs="+", default=["keep", "bf16", "bcq4", "bcq8"])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--rebuild", action="store_true", help="re-quantize cached bases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args()

    tokenizer = load_tokenizer()
    eval_tokens = load_text_tokens(
        tokenizer, find_data_dir() / "wikitext-2" / "test.txt", max_tokens=args.eval_tokens
    )
    calibration = calibration_tokens(args.calibration_sequences)
    records = load_records(args.out)
    done = {(r["base"], r["head"]) for r in records}
    settings = {
        "eval_tokens": args.eval_tokens,
        "calibration_sequences": args.calibration_sequences,
        "command": COMMAND,
    }

    def record(entry: dict) -> None:
        append_record(records, entry, args.out, args.docs, partial(render, settings=settings))

    for base in args.bases:
        name = "fp32" if base == "fp32" else f"q{int(base)}"
        todo = [h for h in args.heads if (name, h) not in done]
        if not todo:
            continue
        if base == "fp32":
            load = load_model
        else:
            path = cached_base(
                int(base),
                cache=args.cache_dir,
                calibration_sequences=args.calibration_sequences,
                rebuild=args.rebuild,
            )

            def load(path: Path = path) -> torch.nn.Module:
                return load_quantized(path)[0]

        hessian = None
        if any(h.startswith("bcq") for h in todo):
            hessian = collect_head_hessian(load(), calibration)  # once per base, for every head
        bits = 3 if base == "fp32" else int(base)  # block bits; only the head settings matter here
        for head in todo:
            model = load()
            began = time.perf_counter()
            quantize_lm_head(model, base_config(bits, head), hessian=hessian)
            seconds = time.perf_counter() - began
            value = perplexity(model, eval_tokens, progress=False)
            record(
                {
                    "base": name,
                    "head": head,
                    "perplexity": value,
                    "head_bytes": head_bytes(model),
                    "model_bytes": summarize(model).model_bytes,
                    "head_seconds": seconds,
                    "eval_tokens": args.eval_tokens,
                }
            )


if __name__ == "__main__":
    main()
