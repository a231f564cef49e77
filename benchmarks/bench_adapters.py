"""Adapter benchmark: how large a task adapter is, and how long switching adapters takes.

For each tuning variant (``--variants``; default: α₁ per group, the default; α₁ per row,
``granularity="row"``; all α; α₁ and the offsets) two adapters are saved with ``save_adapter``
(random values around the base's own: size and speed do not depend on them), then on the same
model (eval mode, served as by ``alphatune generate``):

- sizes: ``adapter.safetensors``, ``adapter_config.json`` and their sum, the trained values, the
  base's size on disk and the base / adapter ratio;
- ``switch_ms``: ``load_adapter`` alternating between the two adapters (reads both files, checks
  every hash, the base fingerprint and the shapes, puts the base values back and writes the new
  ones in place), median;
- ``set_ms``: ``set_adapter`` alternating between the two adapters loaded once under names
  (resident: no file read, no hashing; only the base values put back and the new ones written);
- ``read_ms``: ``read_adapter`` alone (the file and check part of a switch);
- ``fingerprint_ms``: ``base_fingerprint`` alone (hashing the base's codes, done by every load);
- ``first_forward_ms`` / ``forward_ms``: one forward of one token (batch 1, no KV cache) right
  after a switch, when the kernels rebuild their prepared weights, and the same forward again.

Usage::

    python benchmarks/bench_adapters.py                  # SmolLM2 3-bit (cached base), minutes
    python benchmarks/bench_adapters.py --base runs/base # a saved quantized base
    python benchmarks/bench_adapters.py --quick          # tiny random Llama: a smoke run, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import environment, save_results
from rich.console import Console
from rich.table import Table
from torch import nn

from alphatune import (
    AlphaTuningConfig,
    base_fingerprint,
    delete_adapter,
    load_adapter,
    load_quantized,
    prepare_for_alphatuning,
    read_adapter,
    save_adapter,
    save_quantized,
    set_adapter,
)
from alphatune.adapters import DEFAULT_ADAPTER
from alphatune.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

DEFAULT_OUT = Path(__file__).parent / "results" / "adapters.json"
QUICK_OUT = Path(__file__).parent / "results" / "adapters_quick.json"  # never the real results
VARIANTS: dict[str, AlphaTuningConfig] = {
    "alpha1": AlphaTuningConfig(),
    "alpha1-row": AlphaTuningConfig(granularity="row"),
    "all-alpha": AlphaTuningConfig(train="all_alpha"),
    "alpha1+offset": AlphaTuningConfig(train_offset=True),
}
PACKAGES = ("torch", "transformers", "safetensors", "alphatune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=None, help="quantized base directory")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=20, help="timed switches per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = min(args.repeat, 4)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


def base_directory(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The saved base to serve, and a description of it."""
    if args.base is not None:
        return args.base, f"base {args.base}"
    if args.quick:
        from bases import QUICK_CONFIG, QUICK_DESCRIPTION, tiny_quick_base

        model, tokenizer = tiny_quick_base()
        save_quantized(model, work / "base", QUICK_CONFIG, tokenizer)
        return work / "base", QUICK_DESCRIPTION
    from bases import cached_base

    return cached_base(3), "SmolLM2-135M-Instruct, 3 bits calibrated (benchmarks/bases.py)"


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_random_adapters(
    model: nn.Module, tuning: AlphaTuningConfig, directory: Path
) -> tuple[list[Path], int]:
    """Two adapters of ``tuning`` with random values around the model's own; the trained count.

    The model's values are put back afterwards, and nothing of it trains any more.
    """
    prepare_for_alphatuning(model, tuning)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    original = {n: p.detach().clone() for n, p in trainable.items()}
    generator = torch.Generator().manual_seed(0)
    paths = []
    for index in range(2):
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(original[name] * (1 + 0.1 * torch.randn(p.shape, generator=generator)))
        paths.append(save_adapter(model, directory / f"task{index}", tuning))
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(original[name])
    model.requires_grad_(False)
    return paths, sum(p.numel() for p in trainable.values())


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def measure_variant(
    base: Path, name: str, tuning: AlphaTuningConfig, work: Path, repeat: int
) -> dict[str, Any] | None:
    model, _ = load_quantized(base)
    if tuning.train_offset and not any(n.endswith(".offset") for n, _ in model.named_buffers()):
        return None  # a base without offsets has nothing to train there
    (first, second), trained = save_random_adapters(model, tuning, work / name)
    model.eval()
    token = torch.tensor([[1]])

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=token, use_cache=False)

    switches, sets, reads, prints, firsts, steadies = [], [], [], [], [], []
    for index in range(repeat):
        target = (first, second)[index % 2]
        switches.append(timed(lambda target=target: load_adapter(model, target)))
        firsts.append(timed(forward))
        steadies.append(timed(forward))
        reads.append(timed(lambda target=target: read_adapter(model, target)))
        prints.append(timed(lambda: base_fingerprint(model)))
    delete_adapter(model, DEFAULT_ADAPTER)
    load_adapter(model, first, adapter_name="first")
    load_adapter(model, second, adapter_name="second")
    for index in range(repeat):
        sets.append(timed(lambda name=("first", "second")[index % 2]: set_adapter(model, name)))
    weights = (first / ADAPTER_WEIGHTS).stat().st_size
    config = (first / ADAPTER_CONFIG).stat().st_size
    base_bytes = directory_bytes(base)
    return {
        "variant": name,
        "tuning": tuning.to_dict(),
        "trained_values": trained,
        "weights_bytes": weights,
        "config_bytes": config,
        "adapter_bytes": weights + config,
        "base_bytes": base_bytes,
        "base_per_adapter": round(base_bytes / (weights + config), 1),
        "switch_ms": statistics.median(switches),
        "set_ms": statistics.median(sets),
        "read_ms": statistics.median(reads),
        "fingerprint_ms": statistics.median(prints),
        "first_forward_ms": statistics.median(firsts),
        "forward_ms": statistics.median(steadies),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        base, description = base_directory(args, work)
        env = environment(PACKAGES)
        results = []
        for name in args.variants:
            console.print(f"[bold]{name}[/]: saving two adapters, {args.repeat} switches")
            row = measure_variant(base, name, VARIANTS[name], work, args.repeat)
            if row is None:
                console.print(f"  skipped: {base} has no offsets")
                continue
            results.append(row)
    save_results(args.out, args, results, env=env, model=description)
    table = Table(title=f"adapters on {description}")
    for column in ("variant", "values", "file KB", "base/adapter", "switch ms", "set ms"):
        table.add_column(column, justify="right")
    table.add_column("read ms", justify="right")
    table.add_column("fingerprint ms", justify="right")
    table.add_column("1st fwd / fwd ms", justify="right")
    for row in results:
        table.add_row(
            row["variant"],
            f"{row['trained_values']:,}",
            f"{row['adapter_bytes'] / 1024:,.1f}",
            f"{row['base_per_adapter']:,.0f}×",
            f"{row['switch_ms']:.1f}",
            f"{row['set_ms']:.2f}",
            f"{row['read_ms']:.1f}",
            f"{row['fingerprint_ms']:.1f}",
            f"{row['first_forward_ms']:.1f} / {row['forward_ms']:.1f}",
        )
    console.print(table)
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
