"""Does calibrating on data-to-text pairs keep what the 3-bit base loses on WebNLG? (issue 12)

On WebNLG the 3-bit base leaves out more of its input's facts than the 4-bit base or LoRA
(docs/choosing.md, "What 3 bits lose on WebNLG"): it must copy names from the prompt into the
text, and the default quantizer calibrates on WikiText-2 prose, which asks for no such copying.
This probe quantizes SmolLM2 at 3 bits (default calibrated quantizer, 32 x 512 tokens) from:

- ``wikitext``: the default (WikiText-2 valid);
- ``tasks``: training pairs of the data-to-text tasks as the model sees them (prompt, target,
  end of text), E2E and WebNLG alternating, seeded order; WebNLG's four ``webnlg-heldout``
  categories are left out, so that their dev items stay categories no calibration saw
  (``alphatune.data.pairs_batch`` over ``alphatune.experiments.methods.task_pairs``);
- ``mixed``: half of each (the grid's ``calibration=wikitext+tasks`` base);

and, for scale, ``q4-wikitext``: the 4-bit base from the default text. ``wikitext-64``,
``wikitext-128`` and ``mixed-64`` ask whether more calibration text (64 or 128 sequences instead
of 32; GPTQ's paper calibrates on 128 x 2048 tokens) helps the base, with the quantization time.
Each base is scored by its perplexity of the references given their input (teacher-forced, prompt
tokens unscored, the first reference of each item; the loss α-tuning starts from), as a ratio to
the unquantized model's, on: WebNLG dev items of the held-out categories (187; unseen by every
calibration), WebNLG dev items of the other categories (first 400; their categories, not these
items, are in ``tasks``), and E2E dev (first 400 items). It also scores the four texts of
``bench_calibration_sources.py`` (WikiText-2 test; references of WebNLG, E2E and SST-2 dev).

One quantization's perplexity moves by ~1.5% with float order alone (``bench_quantize_speed.py``),
so only larger differences mean anything. Quality only; heavy (one quantization per base).

Usage::

    python benchmarks/bench_task_calibration.py [--bases wikitext tasks mixed q4-wikitext]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from bench_calibration_sources import LENGTH, SEQUENCES, save, scores, start

from alphatune import BCQConfig, quantize_
from alphatune.data import (
    Example,
    calibration_batch,
    encode_example,
    load_e2e_eval,
    load_triples_eval,
    mixed_calibration,
    pairs_batch,
)
from alphatune.experiments.methods import TASK_PAIR_SEED, task_pairs
from alphatune.experiments.tasks import HELD_OUT_CATEGORIES
from alphatune.models import load_model
from alphatune.train import evaluate_loss

DEFAULT_OUT = Path(__file__).parent / "results" / "task_calibration.json"
SCORED_ITEMS = 400  # per non-held-out set: enough for a ~1% perplexity difference to show
MAX_LENGTH = 256

BASES: dict[str, tuple[int, str, int]] = {  # name: (bits, calibration source, sequences)
    "wikitext": (3, "wikitext", SEQUENCES),
    "tasks": (3, "tasks", SEQUENCES),
    "mixed": (3, "mixed", SEQUENCES),
    "q4-wikitext": (4, "wikitext", SEQUENCES),
    "wikitext-64": (3, "wikitext", 64),
    "wikitext-128": (3, "wikitext", 128),
    "mixed-64": (3, "mixed", 64),
}
DEFAULT_BASES = ["wikitext", "tasks", "mixed", "q4-wikitext"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", nargs="+", choices=list(BASES), default=DEFAULT_BASES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def _held_out(category: str | None) -> bool:
    return category in HELD_OUT_CATEGORIES


def conditional_sets(data: Path) -> dict[str, list[Example]]:
    """The (prompt, first reference) pairs scored."""

    def first_refs(items: list) -> list[Example]:
        return [Example(item.prompt, " " + item.references[0]) for item in items]

    dev = data / "webnlg" / "dev.jsonl"
    return {
        "webnlg dev, held-out categories": first_refs(load_triples_eval(dev, categories=_held_out)),
        "webnlg dev, other categories": first_refs(
            load_triples_eval(dev, limit=SCORED_ITEMS, categories=lambda c: not _held_out(c))
        ),
        "e2e dev": first_refs(load_e2e_eval(data / "e2e" / "dev.csv")[:SCORED_ITEMS]),
    }


def conditional_perplexity(model: Any, tokenizer: Any, pairs: list[Example]) -> float:
    """exp(mean loss over the targets' tokens given their prompts, over every pair): training's
    own evaluation loss (``alphatune.train.evaluate_loss``, no label smoothing)."""
    encoded = [encode_example(tokenizer, pair, MAX_LENGTH) for pair in pairs]
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return math.exp(evaluate_loss(model, encoded, pad_id, batch_size=16))


def calibration_rows(tokenizer: Any, data: Path, source: str, sequences: int) -> torch.Tensor:
    """``(sequences, LENGTH)`` calibration token ids from ``source``: WikiText-2 valid, the task
    pairs (the grid's seed), or half of each (``mixed``: the grid's ``wikitext+tasks`` base at 32
    sequences)."""
    wikitext = data / "wikitext-2" / "valid.txt"
    if source == "wikitext":
        return calibration_batch(tokenizer, wikitext, sequences, LENGTH)
    if source == "tasks":
        return pairs_batch(tokenizer, task_pairs(), sequences, LENGTH, TASK_PAIR_SEED)
    return mixed_calibration(
        tokenizer, wikitext, task_pairs(), sequences, LENGTH, seed=TASK_PAIR_SEED
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data, tokenizer, texts, reference, unquantized = start(args.threads)
    pairs = conditional_sets(data)
    reference_conditional = {
        name: conditional_perplexity(reference, tokenizer, items) for name, items in pairs.items()
    }
    print("unquantized, conditional", reference_conditional, flush=True)
    del reference
    unquantized_all = {
        **unquantized,
        **{f"conditional: {k}": v for k, v in reference_conditional.items()},
    }
    rows = []
    for name in args.bases:
        bits, source, sequences = BASES[name]
        calibration = calibration_rows(tokenizer, data, source, sequences)
        model = load_model()
        began = time.perf_counter()
        quantize_(model, BCQConfig(bits=bits), calibration=calibration)
        seconds = time.perf_counter() - began
        conditional = {
            key: conditional_perplexity(model, tokenizer, items) for key, items in pairs.items()
        }
        row = {
            "base": name,
            "bits": bits,
            "calibration": source,
            "calibration_sequences": sequences,
            "quantize_seconds": round(seconds, 1),
            "conditional_perplexity": {k: round(v, 4) for k, v in conditional.items()},
            "conditional_ratio_to_unquantized": {
                k: round(v / reference_conditional[k], 4) for k, v in conditional.items()
            },
            **scores(model, texts, unquantized),
        }
        print(row, flush=True)
        rows.append(row)
        save(args, unquantized_all, rows)  # after each base: a stopped run keeps what it measured
        del model


if __name__ == "__main__":
    main()
