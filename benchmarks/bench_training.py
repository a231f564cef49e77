"""Training-step benchmark: one AlphaTuning step vs one LoRA step, same model, same batch.

- ``alphatune``: the model quantized with BCQ (``--bits``, ``--group-size``), only α₁ trains
  (``prepare_for_alphatuning`` defaults). The base is fitted with the fast data-free ``offset``
  method (one least-squares round): a step costs the same whatever the code values, and the
  layers have the same layout (codes, scales, offsets) as the default ``calibrated`` method's.
- ``lora``: the full-precision (fp32) model with peft LoRA adapters (``--lora-r``, no dropout) on
  the same target modules: the linears ``quantize_`` would replace (those in the transformer
  blocks; ``find_target_layers``).

A step is what ``alphatune.train`` does per batch: forward, ``causal_lm_loss`` with label smoothing
0.1, backward, gradient clipping, AdamW step, zero_grad; the model in eval mode (no dropout). The
batch is ``--batch`` sequences of ``--seq-len`` random token ids, built with ``data.collate``,
every position labelled.

Each config runs in a fresh subprocess (this script with ``--config NAME``), so neither sees the
other's allocations. Memory is the resident set (RSS), which counts torch's tensors; ``tracemalloc``
only sees Python's own allocator, not torch's, so it would miss nearly everything. The lifetime
peak (``resource.getrusage``) includes loading and quantizing, so after setup the process resets
its peak (``/proc/self/clear_refs``, Linux) and reports the peak RSS of the training steps alone
(``ru_maxrss`` again), beside the RSS before them; where the reset is refused, the lifetime peak is
reported and marked so.

Usage::

    python benchmarks/bench_training.py            # SmolLM2-135M, 3 bits, 8 x 128 tokens, minutes
    python benchmarks/bench_training.py --quick    # tiny random Llama, one timed step each
    nice -n 19 python benchmarks/bench_training.py --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import environment, save_results
from rich.console import Console
from rich.table import Table
from torch import nn

from alphatune.config import BCQConfig
from alphatune.data import collate
from alphatune.models import DEFAULT_MODEL, load_model
from alphatune.quantize import find_target_layers, quantize_
from alphatune.train import causal_lm_loss
from alphatune.tuning import prepare_for_alphatuning

CONFIGS = ("alphatune", "lora")
DEFAULT_OUT = Path(__file__).parent / "results" / "training.json"
QUICK_OUT = Path(__file__).parent / "results" / "training_quick.json"  # never the real results
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
QUICK_VOCAB = 256
# alphatune.train's defaults (TrainConfig): AdamW learning rate, weight decay, clipping.
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM, LABEL_SMOOTHING = 2e-3, 0.01, 1.0, 0.1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or directory")
    parser.add_argument("--bits", type=int, default=3, help="BCQ code planes q")
    parser.add_argument(
        "--group-size", default="auto", help="inputs per scale: an integer, 'auto' or 'row'"
    )
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA scaling numerator")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, help=f"results JSON path (default {DEFAULT_OUT.name})")
    parser.add_argument(
        "--quick", action="store_true", help="tiny random Llama, one timed step each (smoke run)"
    )
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.quick:  # one warm-up step keeps first-call costs (numba compiles) out of the time
        args.warmup, args.steps = 1, 1
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    return args


def group_size(text: str) -> int | str | None:
    if text == "row":
        return None
    return text if text == "auto" else int(text)


def build_model(args: argparse.Namespace) -> nn.Module:
    if args.quick:
        sys.path.insert(0, str(TESTS_DIR))
        from tiny_models import make_tiny_llama

        return make_tiny_llama(QUICK_VOCAB)
    return load_model(args.model)


def make_batch(args: argparse.Namespace, vocab_size: int) -> dict[str, torch.Tensor]:
    """``--batch`` rows of ``--seq-len`` random ids, collated as training batches are."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (args.batch, args.seq_len), generator=generator).tolist()
    return collate([{"input_ids": row, "labels": row} for row in ids], pad_id=0)


def prepare(model: nn.Module, name: str, args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """Make ``model`` trainable the ``name`` way; returns it and what was done."""
    targets = list(find_target_layers(model, BCQConfig()))
    if name == "alphatune":
        config = BCQConfig(
            bits=args.bits, group_size=group_size(args.group_size), method="offset", iterations=1
        )
        began = time.perf_counter()
        quantize_(model, config)
        setup_s = time.perf_counter() - began
        prepare_for_alphatuning(model)
        return model, {"target_modules": len(targets), "quantize_s": setup_s}
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets
    )
    return get_peft_model(model, lora), {"target_modules": len(targets)}


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mb() -> float:
    """Current resident set of this process, MB (0.0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident set, MB: ``VmHWM`` (reset by ``clear_refs``; unlike ``ru_maxrss`` it does not
    carry the parent's peak across fork + exec), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Set up one config, time its steps and measure its memory (run in a fresh process)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args)
    batch = make_batch(args, model.config.vocab_size)
    model, info = prepare(model, name, args)
    model.train(False)  # alphatune.train's default: the paper's recipe has no dropout
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step() -> float:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        loss = causal_lm_loss(logits, batch["labels"], LABEL_SMOOTHING)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    setup_peak = peak_rss_mb()
    gc.collect()
    before = rss_mb()
    peak_reset = reset_peak_rss()
    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        began = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - began)
    return {
        "config": name,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_s": statistics.median(times),
        "step_times_s": times,
        "losses": losses,
        "rss_before_steps_mb": before,
        "peak_rss_steps_mb": peak_rss_mb(),
        "peak_rss_is_lifetime": not peak_reset,
        "peak_rss_setup_mb": setup_peak,
        **info,
    }


def child_command(name: str, argv: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--config", name]


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = Table(
        title=f"one training step, {args.batch} x {args.seq_len} tokens, {args.threads} threads "
        f"(median of {args.steps} after {args.warmup} warm-up)"
    )
    for column in ["config", "trainable params", "step s", "tokens/s", "RSS before MB",
                   "peak RSS steps MB", "peak RSS setup MB"]:  # fmt: skip
        table.add_column(column, justify="right")
    tokens = args.batch * args.seq_len
    for r in rows:
        table.add_row(
            r["config"],
            f"{r['trainable_params']:,}",
            f"{r['step_s']:.3f}",
            f"{tokens / r['step_s']:.0f}",
            f"{r['rss_before_steps_mb']:.0f}",
            f"{r['peak_rss_steps_mb']:.0f}" + (" (lifetime)" if r["peak_rss_is_lifetime"] else ""),
            f"{r['peak_rss_setup_mb']:.0f}",
        )
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.config:  # child: one config, result as the last line of stdout
        print(json.dumps(run_config(args.config, args)))
        return
    # Before the run, so its load is not in the average; the steps run in children with --threads.
    env = environment(("torch", "transformers", "peft")) | {"threads": args.threads}
    console = Console()
    model_name = "tiny random Llama (tests/tiny_models.py)" if args.quick else args.model
    console.print(
        f"model: {model_name}; alphatune base: BCQ {args.bits} bits, group {args.group_size}, "
        "data-free 'offset' fit (step time does not depend on code values); "
        f"lora: r={args.lora_r} on the fp32 model"
    )
    rows = []
    for name in CONFIGS:
        began = time.perf_counter()
        done = subprocess.run(
            child_command(name, argv), check=False, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        console.log(f"{name}: {time.perf_counter() - began:.1f} s in its subprocess")
    print_table(rows, args)
    ours, lora = rows
    ratio = {
        key: ours[key] / lora[key]
        for key in ("step_s", "peak_rss_steps_mb", "rss_before_steps_mb", "trainable_params")
    }
    console.print("alphatune / lora: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
    save_results(
        args.out,
        args,
        rows,
        env=env,
        alphatune_base="BCQ fitted with the data-free 'offset' method, 1 iteration",
        alphatune_over_lora=ratio,
    )
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
