"""Which layers to keep at 4 bits in a 3-bit base? (issue 12: "keeping sensitive layers at more bits")

On WebNLG a 4-bit base closes the 3-bit base's gap to LoRA (docs/choosing.md), at 14 MiB more
storage. ``BCQConfig.layer_bits`` keeps chosen layers at more bits; this probe quantizes SmolLM2
with the default calibrated quantizer for each variant below and scores the quantized /
unquantized perplexity ratio on the four texts of ``bench_calibration_sources.py`` (WikiText-2
test and the references of WebNLG dev, E2E dev, SST-2 dev), with the layers' stored size:

- ``q3`` / ``q4``: every layer at 3 / 4 bits (the two ends);
- ``q3-down4``: the MLP's output projections at 4 bits;
- ``q3-o-down4``: and the attention's output projections;
- ``q3-v-o-down4``: and the value projections (llama.cpp's Q3_K_M keeps these three kinds at
  more bits);
- ``q3-ends4``: the first and last two blocks at 4 bits.

One quantization's perplexity moves by ~1.5% with float order alone (``bench_quantize_speed.py``),
so only larger differences mean anything. Quality only: it may run beside other work, but it is
heavy (one quantization per variant); pause other jobs if time matters.

Usage::

    python benchmarks/bench_mixed_precision.py [--variants q3 q3-down4 ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench_calibration_sources import LENGTH, SEQUENCES, save, scores, start

from alphatune import BCQConfig, quantize_
from alphatune.data import calibration_batch
from alphatune.models import load_model

DEFAULT_OUT = Path(__file__).parent / "results" / "mixed_precision.json"
MIB = 2**20

VARIANTS: dict[str, tuple[int, dict[str, int]]] = {
    "q3": (3, {}),
    "q3-down4": (3, {"*.down_proj": 4}),
    "q3-o-down4": (3, {"*.o_proj": 4, "*.down_proj": 4}),
    "q3-v-o-down4": (3, {"*.v_proj": 4, "*.o_proj": 4, "*.down_proj": 4}),
    "q3-ends4": (3, {"*.layers.0.*": 4, "*.layers.1.*": 4, "*.layers.28.*": 4, "*.layers.29.*": 4}),
    "q4": (4, {}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data, tokenizer, texts, reference, unquantized = start(args.threads)
    del reference
    calibration = calibration_batch(tokenizer, data / "wikitext-2" / "valid.txt", SEQUENCES, LENGTH)
    rows = []
    for variant in args.variants:
        bits, layer_bits = VARIANTS[variant]
        model = load_model()
        config = BCQConfig(bits=bits, layer_bits=layer_bits)
        summary = quantize_(model, config, calibration=calibration)
        row = {
            "variant": variant,
            "bits": bits,
            "layer_bits": layer_bits,
            "bits_per_weight": summary.bits_per_weight,
            "layers_mib": round(summary.quantized_bytes / MIB, 2),
            **scores(model, texts, unquantized),
        }
        print(row, flush=True)
        rows.append(row)
    save(args, unquantized, rows)


if __name__ == "__main__":
    main()
