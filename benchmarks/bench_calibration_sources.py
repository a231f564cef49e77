"""Does more varied calibration text make the 3-bit base hold up better off WikiText-2? (issue 12)

The default calibrated quantizer sees 32 x 512 tokens of WikiText-2 (valid). Its base is weaker
off that domain (issue 12: Penn Treebank perplexity 1.88x the unquantized model's against
1.51x on WikiText-2), and on held-out WebNLG data AlphaTuning trails LoRA most on unseen
categories. This probe quantizes SmolLM2 at 3 bits from three calibration sources of the same
size and compares the quantized/unquantized perplexity ratio on four texts:

- ``wikitext``: the default (WikiText-2 valid);
- ``self``: text sampled from the unquantized model itself (from BOS, temperature 1, top-p 0.95,
  seeded; cached), data-free and as varied as the model's own distribution;
- ``mixed``: half of each.

Texts scored: WikiText-2 test, and the references of WebNLG dev, E2E dev and the sentences of
SST-2 dev, none of them seen by any calibration (first 8,192 tokens each, context 512). One
quantization's perplexity moves by ~1.5% with float order alone (``bench_quantize_speed.py``),
so only larger differences mean anything. Quality only: it may run beside other work, but it
is heavy (three quantizations); pause other jobs if time matters.

Usage::

    python benchmarks/bench_calibration_sources.py
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch
from common import environment
from safetensors.torch import load_file, save_file

from alphatune import BCQConfig, quantize_
from alphatune.data import calibration_batch, find_data_dir, load_text_tokens
from alphatune.evaluate import perplexity
from alphatune.models import load_model, load_tokenizer

DEFAULT_OUT = Path(__file__).parent / "results" / "calibration_sources.json"
CACHE = Path.home() / ".cache" / "alphatune" / "bench" / "calibration"
SEQUENCES, LENGTH, EVAL_TOKENS = 32, 512, 8192


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=["wikitext", "self", "mixed"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def self_generated(model: Any, tokenizer: Any, sequences: int, seed: int = 0) -> torch.Tensor:
    """``(sequences, LENGTH)`` token ids sampled from ``model`` after BOS, cached on disk."""
    path = CACHE / f"self-{sequences}x{LENGTH}-seed{seed}.safetensors"
    if path.exists():
        return load_file(path)["ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.full((sequences, 1), bos),
            attention_mask=torch.ones(sequences, 1, dtype=torch.long),
            do_sample=True, temperature=1.0, top_p=0.95,
            max_new_tokens=LENGTH - 1, min_new_tokens=LENGTH - 1,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    ids = out[:, :LENGTH].contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids}, path)
    return ids


def eval_texts(tokenizer: Any, data: Path) -> dict[str, torch.Tensor]:
    """The token streams scored: WikiText-2 test and three task texts joined by line breaks."""

    def stream(lines: list[str]) -> torch.Tensor:
        ids = tokenizer("\n".join(lines))["input_ids"][:EVAL_TOKENS]
        return torch.tensor(ids, dtype=torch.long)

    webnlg = [
        ref for line in (data / "webnlg" / "dev.jsonl").read_text().splitlines() if line.strip()
        for ref in json.loads(line)["refs"]
    ]  # fmt: skip
    with open(data / "e2e" / "dev.csv", encoding="utf-8", newline="") as handle:
        e2e = [row["ref"] for row in csv.DictReader(handle)]
    sst2 = [
        line.split("\t")[0]
        for line in (data / "sst2" / "dev.tsv").read_text().splitlines()[1:]
        if line.strip()
    ]
    return {
        "wikitext-2 test": load_text_tokens(
            tokenizer, data / "wikitext-2" / "test.txt", max_tokens=EVAL_TOKENS
        ),
        "webnlg dev refs": stream(webnlg),
        "e2e dev refs": stream(e2e),
        "sst2 dev sentences": stream(sst2),
    }


def scores(model: Any, texts: dict[str, torch.Tensor], unquantized: dict[str, float]) -> dict:
    """``model``'s perplexity on each text and its ratio to the unquantized model's."""
    values = {name: perplexity(model, ids, progress=False) for name, ids in texts.items()}
    return {
        "perplexity": {k: round(v, 3) for k, v in values.items()},
        "ratio_to_unquantized": {k: round(v / unquantized[k], 4) for k, v in values.items()},
    }


def save(args: argparse.Namespace, unquantized: dict[str, float], rows: list[dict]) -> None:
    """The probe's rows with what measured them, as ``args.out``."""
    result = {
        "environment": environment(("torch", "transformers", "numba")),
        "args": {k: str(v) for k, v in vars(args).items()},
        "calibration": [SEQUENCES, LENGTH],
        "eval_tokens": EVAL_TOKENS,
        "unquantized": {k: round(v, 3) for k, v in unquantized.items()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


def start(threads: int) -> tuple[Path, Any, dict[str, torch.Tensor], Any, dict[str, float]]:
    """What a probe begins with: the data folder, the tokenizer, the texts scored, the
    unquantized model and its perplexity on each text."""
    torch.set_num_threads(threads)
    data = find_data_dir()
    tokenizer = load_tokenizer()
    texts = eval_texts(tokenizer, data)
    reference = load_model()
    unquantized = {name: perplexity(reference, ids, progress=False) for name, ids in texts.items()}
    print("unquantized", unquantized, flush=True)
    return data, tokenizer, texts, reference, unquantized


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data, tokenizer, texts, reference, unquantized = start(args.threads)
    wikitext = calibration_batch(tokenizer, data / "wikitext-2" / "valid.txt", SEQUENCES, LENGTH)
    generated = self_generated(reference, tokenizer, SEQUENCES)
    del reference
    sources = {
        "wikitext": wikitext,
        "self": generated,
        "mixed": torch.cat([wikitext[: SEQUENCES // 2], generated[: SEQUENCES // 2]]),
    }
    rows = []
    for source in args.sources:
        model = load_model()
        quantize_(model, BCQConfig(bits=3), calibration=sources[source])
        row = {"source": source, **scores(model, texts, unquantized)}
        print(row, flush=True)
        rows.append(row)
    save(args, unquantized, rows)


if __name__ == "__main__":
    main()
