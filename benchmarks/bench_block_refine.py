"""Does training a 3-bit base's scales block by block make it hold up off WikiText-2? (issue 12)

A probe of a method that did not land. After the default calibrated quantizer has fitted a
transformer block (GPTQ onto the BCQ-with-offset grid), its scales (α, all planes, and the
offsets; the codes stay frozen, as AlphaTuning freezes them) are trained with Adam for a few
passes over the calibration batches, so that the quantized block's output matches the
unquantized block's output on the same inputs (mean squared error; block-wise reconstruction
as in OmniQuant or EfficientQAT's block stage, restricted to BCQ's scales). The next block is
then calibrated on the refined block's outputs.

The question it answers: AlphaTuning 3-bit trails LoRA on WebNLG (docs/choosing.md), and the
3-bit base's perplexity on WebNLG's references is 1.72x the unquantized model's. Does a better
fitted base close that? Scored as ``bench_calibration_sources.py`` scores (quantized /
unquantized perplexity on WikiText-2 test and the references of WebNLG dev, E2E dev, SST-2 dev).
A variant is ``EPOCHS:LR``; ``0:0`` is the default quantizer (no refinement), measured in the
same run.

Quality only, heavy (one quantization per variant, 3-5 minutes each with refinement, and the
scoring): pause other jobs while it runs.

Usage::

    python benchmarks/bench_block_refine.py [--variants 0:0 2:3e-4 ...]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_calibration_sources import LENGTH, SEQUENCES, save, scores, start
from torch import nn

import alphatune.calibration as calibration_module
import alphatune.quantize as quantize_module
from alphatune import BCQConfig, quantize_
from alphatune.data import calibration_batch
from alphatune.layers import BCQLinear
from alphatune.models import load_model

DEFAULT_OUT = Path(__file__).parent / "results" / "block_refine.json"

Inputs = list[tuple[tuple, dict]]  # one block's positional and keyword inputs per batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["0:0", "2:3e-4", "4:1e-3"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def refine_block(
    block: nn.Module, inputs: Inputs, targets: list[torch.Tensor], epochs: int, lr: float
) -> tuple[float, float]:
    """Train the scales and offsets of ``block``'s quantized layers towards ``targets`` (the
    unquantized block's outputs for ``inputs``). Returns the summed loss of the first and last
    epochs."""
    layers = [m for m in block.modules() if isinstance(m, BCQLinear)]
    params = []
    for layer in layers:
        layer.make_trainable(alpha_rest=True, offset=True)
        params += [t for t in (layer.alpha1, layer.alpha_rest, layer.offset) if t is not None]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            total = 0.0
            for (args, kwargs), target in zip(inputs, targets, strict=True):
                output = calibration_module._block_output(block(*args, **kwargs))
                loss = F.mse_loss(output, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            losses.append(total)
    for p in params:
        p.requires_grad_(False)
    for layer in layers:
        layer.release_weight_cache()
    return losses[0], losses[-1]


def refining_sequentially(epochs: int, lr: float) -> Callable[..., set[str]]:
    """``alphatune.calibration.quantize_sequentially`` with one step added: each block's
    unquantized pass runs to the block's end (its outputs are the targets) and the fitted block
    is refined (``epochs`` passes at ``lr``; none for 0) before its outputs feed the next block."""
    c = calibration_module

    def quantize_sequentially(
        model: nn.Module,
        layers: dict[str, nn.Module],
        calibration: torch.Tensor,
        fit_layer: Callable[[str, nn.Module, torch.Tensor | None], None],
        batch_size: int = 4,
        after_block: Callable[[], None] | None = None,
    ) -> set[str]:
        prefix, blocks = c._transformer_blocks(model, layers)
        done = set()
        with c.eval_mode(model), torch.no_grad():
            inputs = c._block_inputs(model, blocks[0], calibration, batch_size)
            for index, block in enumerate(blocks):
                targets = {n: m for n, m in layers.items() if n.startswith(f"{prefix}.{index}.")}
                with c.recording_hessians(targets) as hessians:
                    expected = [c._block_output(block(*a, **k)).clone() for a, k in inputs]
                for name, module in targets.items():
                    fit_layer(name, module, hessians.pop(name))
                    done.add(name)
                if epochs:
                    began = time.perf_counter()
                    first, last = refine_block(block, inputs, expected, epochs, lr)
                    seconds = time.perf_counter() - began
                    print(f"block {index}: loss {first:.4g} -> {last:.4g} ({seconds:.1f} s)")
                if after_block is not None:
                    after_block()
                with c.keeping_dense_weights(block):
                    inputs = [
                        c._replace_hidden(a, k, c._block_output(block(*a, **k))) for a, k in inputs
                    ]
        return done

    return quantize_sequentially


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data, tokenizer, texts, reference, unquantized = start(args.threads)
    del reference
    calibration = calibration_batch(tokenizer, data / "wikitext-2" / "valid.txt", SEQUENCES, LENGTH)
    rows = []
    for variant in args.variants:
        epochs, lr = variant.split(":")
        quantize_module.quantize_sequentially = refining_sequentially(int(epochs), float(lr))
        model = load_model()
        began = time.perf_counter()
        quantize_(model, BCQConfig(bits=3), calibration=calibration)
        row = {
            "variant": variant,
            "epochs": int(epochs),
            "lr": float(lr),
            "quantize_seconds": round(time.perf_counter() - began, 1),
            **scores(model, texts, unquantized),
        }
        print(row, flush=True)
        rows.append(row)
    save(args, unquantized, rows)


if __name__ == "__main__":
    main()
