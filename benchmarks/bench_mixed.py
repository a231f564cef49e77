"""Mixed-task batch benchmark: every row with its own adapter vs one adapter for the whole batch.

A batch of ``--rows`` prompts (default 8) is run three ways on the same quantized model:

- ``single``: one adapter loaded with ``load_adapter``; the default inference path (the dense
  weight of each layer is cached between calls);
- ``mixed``:  ``--adapters`` adapters (default 4) loaded with ``load_adapters``, rows assigned
  round-robin (``bank.rows``), through ``kernels.bcq_matmul_mixed``;
- ``mixed1``: the bank path with every row on the same adapter (the cost of the mixed kernel
  itself, without splitting the batch by adapter).

Two phases are timed, median milliseconds:

- ``prefill``: the whole batch of ``--prompt-length`` tokens per row, building the KV cache;
- ``decode``:  one new token per row with the KV cache (``--new-tokens`` steps after each
  prefill, every step timed);

on the whole model, and on one layer of each distinct shape (``layer(x)`` with x ``(rows, 1, in)``
for decode and ``(rows, prompt_length, in)`` for prefill). ``overhead`` is ``mixed / single - 1``.
Adapter values are random (the speed does not depend on them).

Usage::

    python benchmarks/bench_mixed.py                   # embedded SmolLM2, quantized data-free
    python benchmarks/bench_mixed.py --base runs/base  # a saved quantized base
    python benchmarks/bench_mixed.py --quick           # tiny random Llama: a smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from common import environment, save_results, time_ms
from rich.console import Console
from rich.table import Table
from torch import nn

from alphatune import AlphaTuningConfig, BCQConfig, prepare_for_alphatuning, quantize_
from alphatune.adapters import load_adapter, load_quantized, save_adapter, unload_adapter
from alphatune.mixed import load_adapters, unload_adapters
from alphatune.quantize import quantized_layers

DEFAULT_OUT = Path(__file__).parent / "results" / "mixed.json"
QUICK_OUT = Path(__file__).parent / "results" / "mixed_quick.json"
MODES = ("single", "mixed", "mixed1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="quantized base directory")
    parser.add_argument("--bits", type=int, default=3, help="bits when quantizing (no --base)")
    parser.add_argument("--rows", type=int, default=8, help="batch rows (prompts)")
    parser.add_argument("--adapters", type=int, default=4, help="adapters in the mixed batch")
    parser.add_argument("--prompt-length", type=int, default=64, help="tokens per row, prefill")
    parser.add_argument("--new-tokens", type=int, default=8, help="decode steps per prefill")
    parser.add_argument("--repeat", type=int, default=5, help="prefills per mode (median)")
    parser.add_argument("--layer-repeat", type=int, default=20, help="timed runs per layer call")
    parser.add_argument("--threads", default="all", help="torch threads: a number or 'all'")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the modes (best kept)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama (smoke run)")
    args = parser.parse_args(argv)
    if args.adapters < 2 or args.rows < args.adapters:
        parser.error("need --adapters >= 2 and --rows >= --adapters")
    if args.quick:
        args.prompt_length, args.new_tokens = min(args.prompt_length, 16), min(args.new_tokens, 4)
        args.repeat, args.layer_repeat = min(args.repeat, 3), min(args.layer_repeat, 5)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


def build_model(args: argparse.Namespace) -> tuple[nn.Module, str]:
    """The quantized model to time, and a description of it."""
    if args.quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = LlamaForCausalLM(config).eval()
        quantize_(model, BCQConfig(bits=args.bits, group_size=32, method="offset"))
        return model, "tiny random Llama (quick)"
    if args.base is not None:
        model, _ = load_quantized(args.base)
        return model, f"base {args.base}"
    from alphatune.models import DEFAULT_MODEL, load_model

    model = load_model()
    quantize_(model, BCQConfig(bits=args.bits, method="offset"))  # data-free: speed only
    return model, f"{DEFAULT_MODEL}, {args.bits} bits (offset, auto groups)"


def save_random_adapters(model: nn.Module, count: int, directory: Path) -> dict[str, Path]:
    """``count`` α₁ adapters with random values around the model's own α₁."""
    prepare_for_alphatuning(model, AlphaTuningConfig())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    original = {n: p.detach().clone() for n, p in trainable.items()}
    generator = torch.Generator().manual_seed(0)
    paths = {}
    for index in range(count):
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(original[name] * (1 + 0.1 * torch.randn(p.shape, generator=generator)))
        paths[f"task{index}"] = save_adapter(model, directory / f"task{index}", AlphaTuningConfig())
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(original[name])
    model.requires_grad_(False)
    return paths


def model_times(
    model: nn.Module, rows: AbstractContextManager[None], args: argparse.Namespace
) -> dict[str, float]:
    """Median prefill and decode-step ms of the whole model under ``rows``."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (args.rows, args.prompt_length), generator=generator)
    step = torch.randint(0, vocab, (args.rows, 1), generator=generator)
    prefill, decode = [], []
    with torch.inference_mode(), rows:
        for run in range(args.repeat + 1):  # run 0 warms up
            began = time.perf_counter()
            cache = model(input_ids=prompt, use_cache=True).past_key_values
            prefill.append(time.perf_counter() - began)
            for _ in range(args.new_tokens):
                began = time.perf_counter()
                cache = model(input_ids=step, past_key_values=cache, use_cache=True).past_key_values
                if run:
                    decode.append(time.perf_counter() - began)
    return {
        "prefill_ms": statistics.median(prefill[1:]) * 1e3,
        "decode_ms": statistics.median(decode) * 1e3,
    }


def layer_times(
    layer: nn.Module, rows: AbstractContextManager[None], args: argparse.Namespace
) -> dict[str, float]:
    """Median ms of one layer call on a decode-shaped and a prefill-shaped input."""
    generator = torch.Generator().manual_seed(2)
    decode = torch.randn(args.rows, 1, layer.in_features, generator=generator)
    prefill = torch.randn(args.rows, args.prompt_length, layer.in_features, generator=generator)
    with torch.inference_mode(), rows:
        return {
            "prefill_ms": time_ms(lambda: layer(prefill), args.layer_repeat),
            "decode_ms": time_ms(lambda: layer(decode), args.layer_repeat),
        }


def prepare_mode(
    mode: str, model: nn.Module, paths: dict[str, Path], args: argparse.Namespace
) -> Callable[[], AbstractContextManager[None]]:
    """Load what ``mode`` needs; returns a maker of the context that sets each row's adapter."""
    names = list(paths)
    unload_adapters(model)
    unload_adapter(model)
    if mode == "single":
        load_adapter(model, paths[names[0]])
        return nullcontext
    bank = load_adapters(model, paths)
    if mode == "mixed":
        rows = [names[i % len(names)] for i in range(args.rows)]  # round-robin
    else:
        rows = [names[0]] * args.rows
    return lambda: bank.rows(rows)


def run(args: argparse.Namespace, console: Console) -> tuple[list[dict], str]:
    model, description = build_model(args)
    console.log(f"model: {description}; threads={torch.get_num_threads()}")
    layers: dict[tuple[int, int], nn.Module] = {}  # one layer per distinct (out, in)
    for _, layer in quantized_layers(model):
        layers.setdefault((layer.out_features, layer.in_features), layer)
    results = []
    with tempfile.TemporaryDirectory() as directory:
        paths = save_random_adapters(model, args.adapters, Path(directory))
        by_mode: dict[str, dict[str, dict[str, float]]] = {mode: {} for mode in MODES}
        # Several rounds over the modes, keeping each one's fastest: whichever mode runs first
        # otherwise pays for the machine warming up (measured up to 15% on this shared VM).
        for round_ in range(args.rounds):
            for mode in MODES:
                rows = prepare_mode(mode, model, paths, args)
                times = {"model": model_times(model, rows(), args)}
                for (out, in_features), layer in layers.items():
                    times[f"{out}x{in_features}"] = layer_times(layer, rows(), args)
                for target, phases in times.items():
                    best = by_mode[mode].setdefault(target, phases)
                    by_mode[mode][target] = {k: min(v, best[k]) for k, v in phases.items()}
                console.log(f"round {round_ + 1}, {mode}: {times['model']}")
        unload_adapters(model)
    for target in by_mode["single"]:
        for phase in ("prefill", "decode"):
            row = {"target": target, "phase": phase, "rows": args.rows}
            row |= {f"{mode}_ms": by_mode[mode][target][f"{phase}_ms"] for mode in MODES}
            row["overhead_pct"] = 100 * (row["mixed_ms"] / row["single_ms"] - 1)
            row["overhead1_pct"] = 100 * (row["mixed1_ms"] / row["single_ms"] - 1)
            results.append(row)
    return results, description


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    title = (
        f"{args.rows} rows: {args.adapters} adapters (mixed) vs 1 (single); "
        f"median ms, prompt {args.prompt_length} tokens"
    )
    table = Table(title=title)
    for name in ("target", "phase", "single", "mixed", "mixed1", "overhead", "overhead1"):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(
            r["target"],
            r["phase"],
            f"{r['single_ms']:.3f}",
            f"{r['mixed_ms']:.3f}",
            f"{r['mixed1_ms']:.3f}",
            f"{r['overhead_pct']:+.0f}%",
            f"{r['overhead1_pct']:+.0f}%",
        )
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    torch.set_num_threads((os.cpu_count() or 1) if args.threads == "all" else int(args.threads))
    env = environment(("torch", "transformers"))  # before the run: its load is not in the average
    results, description = run(args, console)
    print_table(results, args)
    save_results(args.out, args, results, env=env, model=description)
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
