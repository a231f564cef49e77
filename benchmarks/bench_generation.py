"""Model-level generation benchmark: batch-1 greedy decode, 512-token prefill, peak memory.

Configs (``--configs``), each measured in a fresh subprocess so that its peak resident memory
(``VmHWM``) is its own:

- ``fp32``, ``bf16``: the unquantized model (``transformers``, KV cache);
- ``q3``, ``q4``: ours, calibrated BCQ bases (group "auto") with the LM head kept;
- ``q3-<head>``, ``q4-<head>``: the same blocks with a lower-precision head (``--head``, default
  ``bf16``, the most accurate one in ``bench_lm_head.py``; ``bcqN`` for an N-bit BCQ head);
- ``nf4``: QLoRA's base, bitsandbytes NF4 ``Linear4bit`` (double quantization, bf16 compute, the
  rest in bf16) loaded through ``BitsAndBytesConfig``; if bitsandbytes cannot run here, the error
  is recorded in the results instead.

Every config runs at each ``--threads`` count (``torch.set_num_threads``): prefill of a
``--prefill``-token prompt (one forward with a KV cache, logits of the last position only, as
``generate`` does; median of ``--repeats``) and greedy generation of exactly ``--new-tokens`` tokens
from a fixed prompt (``min_new_tokens = max_new_tokens``, so every config generates the same
count; one warm-up, then the median of ``--repeats``). ``agree`` counts the leading generated
tokens equal to fp32's. Quantized bases are built once and cached (``bases.py``, ``--cache-dir``).

Usage::

    python benchmarks/bench_generation.py --quick     # tiny random model, a few tokens: a smoke run
    python benchmarks/bench_generation.py             # SmolLM2, every config (long)
    python benchmarks/bench_generation.py --configs fp32 q3 q3-bf16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import environment, save_results
from rich.console import Console
from rich.table import Table

DEFAULT_OUT = Path(__file__).parent / "results" / "generation.json"
DEFAULT_HEAD = "bf16"
PROMPT = "The history of the city begins in the Roman period, when"
QUICK_VOCAB = 256
console = Console(stderr=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="default: all (see above)")
    parser.add_argument(
        "--head",
        nargs="+",
        default=[DEFAULT_HEAD],
        help="lower-precision head(s) for the q3-/q4- configs: bf16 or bcqN (default: bf16)",
    )
    parser.add_argument("--threads", default="1,all", help="comma-separated counts or 'all'")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens for prefill")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="quantized bases cache")
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per config")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="tiny random model (seconds)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON spec: run one config
    args = parser.parse_args(argv)
    if args.configs is None:
        ours = [
            f"q{bits}{suffix}" for bits in (3, 4) for suffix in ["", *(f"-{h}" for h in args.head)]
        ]
        args.configs = ["fp32", "bf16", *ours, "nf4"]
    if args.quick:
        args.new_tokens, args.prefill, args.repeats = 8, 32, 1
        if args.out == DEFAULT_OUT:  # a smoke run: keep benchmarks/results for real numbers
            args.out = Path(tempfile.gettempdir()) / "bench_generation_quick.json"
    return args


def parse_threads(text: str) -> list[int]:
    available = os.cpu_count() or 1
    return sorted({available if t.strip() == "all" else int(t) for t in text.split(",")})


# ---------------------------------------------------------------- worker (one config per process)
def rss_bytes() -> int:
    """Current resident set size (Linux /proc), 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: ``VmHWM``, the high-water mark of this process image. Not ``ru_maxrss``: that one
    survives ``fork`` + ``exec``, so a worker started by a parent holding the fp32 model would
    report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def import_for(kind: str) -> None:
    """Import what loading ``kind`` needs, so that the RSS baseline includes the libraries."""
    import transformers  # noqa: F401

    if kind == "alphatune":
        import alphatune.adapters  # noqa: F401
    if kind == "nf4":
        import bitsandbytes  # noqa: F401


def load_for(spec: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kind = spec["kind"]
    if kind == "hf":
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
        return AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
    if kind == "alphatune":
        from alphatune.adapters import load_quantized

        return load_quantized(spec["path"])[0].eval()
    if kind == "nf4":
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            spec["path"], quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
        )
        return model.eval()
    raise ValueError(f"unknown config kind {kind!r}")


def time_s(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_worker(spec: dict) -> dict:
    """Load one config, then time prefill and generation at every thread count."""
    from transformers import GenerationConfig

    import_for(spec["kind"])
    result: dict = {"name": spec["name"], "rss_before_load": rss_bytes()}
    began = time.perf_counter()
    model = load_for(spec)
    result["load_seconds"] = time.perf_counter() - began
    result["rss_after_load"] = rss_bytes()
    prompt = torch.tensor([spec["prompt"]])  # (1, p)
    prefill = torch.tensor([spec["prefill"]])  # (1, P)
    n = spec["new_tokens"]

    def greedy(tokens: int) -> GenerationConfig:
        # min_new_tokens: the stop token is suppressed, so every config generates `tokens`.
        return GenerationConfig(
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=spec["pad_token_id"],
        )

    generation, warmup = greedy(n), greedy(2)

    def generate(config: GenerationConfig) -> torch.Tensor:
        mask = torch.ones_like(prompt)
        return model.generate(prompt, attention_mask=mask, generation_config=config)

    def forward_prefill() -> None:
        model(input_ids=prefill, use_cache=True, logits_to_keep=1)

    runs = []
    for threads in spec["threads"]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            forward_prefill()  # warm-up: first-call allocations, dense caches of quantized layers
            prefill_s = time_s(forward_prefill, spec["repeats"])
        generate(warmup)
        output = None
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            output = generate(generation)
            times.append(time.perf_counter() - t0)
        assert output is not None
        new = output[0, prompt.shape[1] :].tolist()
        seconds = statistics.median(times)
        runs.append(
            {
                "threads": threads,
                "prefill_tokens": prefill.shape[1],
                "prefill_seconds": prefill_s,
                "prefill_tokens_per_s": prefill.shape[1] / prefill_s,
                "new_tokens": len(new),
                "generate_seconds": seconds,
                "decode_tokens_per_s": len(new) / seconds,
                "tokens": new,
            }
        )
    result["runs"] = runs
    result["peak_rss"] = peak_rss_bytes()
    result["peak_rss_over_baseline"] = result["peak_rss"] - result["rss_before_load"]
    return result


# ---------------------------------------------------------------- parent
def quick_models(directory: Path, configs: list[str], prefill: int) -> tuple[dict, dict]:
    """Tiny random Llama: an HF directory and our bases (offset method, no calibration)."""
    from bases import parse_head
    from transformers import LlamaConfig, LlamaForCausalLM

    from alphatune import BCQConfig, quantize_
    from alphatune.adapters import save_quantized

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=QUICK_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory / "fp32")
    paths = {"hf": str(directory / "fp32")}
    for name in configs:
        if not name.startswith("q"):
            continue
        bits, _, head_name = name[1:].partition("-")
        mode, head_bits = parse_head(head_name or "keep")
        quantized = LlamaForCausalLM(config).eval()
        quantized.load_state_dict(model.state_dict())
        bcq = BCQConfig(
            bits=int(bits), group_size=32, method="offset", lm_head=mode, lm_head_bits=head_bits
        )
        quantize_(quantized, bcq)
        save_quantized(quantized, directory / name, bcq)
        paths[name] = str(directory / name)
    inputs = {
        "prompt": torch.arange(3, 3 + 8).tolist(),
        "prefill": (torch.arange(prefill) * 7 % QUICK_VOCAB).tolist(),
        "pad_token_id": 0,
    }
    return paths, inputs


def real_models(args: argparse.Namespace) -> tuple[dict, dict]:
    """SmolLM2: the cached HF directory and our cached bases (built on first use: minutes)."""
    from bases import DEFAULT_CACHE, cached_base

    from alphatune.data import find_data_dir, load_text_tokens
    from alphatune.models import load_tokenizer, resolve_model_path

    paths = {"hf": resolve_model_path()}
    for name in args.configs:
        if name.startswith("q"):
            bits, _, head = name[1:].partition("-")
            paths[name] = str(
                cached_base(
                    int(bits),
                    head or "keep",
                    cache=args.cache_dir or DEFAULT_CACHE,
                    calibration_sequences=args.calibration_sequences,
                    log=console.log,
                )
            )
    tokenizer = load_tokenizer()
    prefill = load_text_tokens(
        tokenizer, find_data_dir() / "wikitext-2" / "test.txt", max_tokens=args.prefill
    )
    if prefill.numel() < args.prefill:
        raise SystemExit(f"WikiText-2 test has fewer than {args.prefill} tokens")
    inputs = {
        "prompt": tokenizer(PROMPT)["input_ids"],
        "prefill": prefill[: args.prefill].tolist(),
        "pad_token_id": tokenizer.pad_token_id,
    }
    return paths, inputs


def spec_for(name: str, paths: dict) -> dict:
    if name in ("fp32", "bf16"):
        return {
            "kind": "hf",
            "path": paths["hf"],
            "dtype": "float32" if name == "fp32" else "bfloat16",
        }
    if name == "nf4":
        return {"kind": "nf4", "path": paths["hf"]}
    if name.startswith("q"):
        return {"kind": "alphatune", "path": paths[name]}
    raise SystemExit(f"unknown config {name!r}: use fp32, bf16, q3, q4, q3-<head>, q4-<head>, nf4")


def run_config(spec: dict, timeout: float) -> dict:
    """Run one config in a fresh interpreter; its error (if any) becomes the result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"name": spec["name"], "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        return {"name": spec["name"], "error": f"exit {done.returncode}: " + "\n".join(tail)}
    return json.loads(lines[-1])


def add_ratios(results: list[dict]) -> None:
    """Ratios vs fp32 at the same thread count, and greedy agreement with fp32's tokens."""
    fp32 = next((r for r in results if r["name"] == "fp32" and "runs" in r), None)
    if fp32 is None:
        return
    base = {run["threads"]: run for run in fp32["runs"]}
    for r in results:
        if "runs" not in r:
            continue
        r["peak_rss_vs_fp32"] = r["peak_rss"] / fp32["peak_rss"]
        r["peak_over_baseline_vs_fp32"] = (
            r["peak_rss_over_baseline"] / fp32["peak_rss_over_baseline"]
        )
        for run in r["runs"]:
            ref = base.get(run["threads"])
            if ref is None:
                continue
            run["decode_vs_fp32"] = run["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            run["prefill_vs_fp32"] = run["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"]
            agree = 0
            for a, b in zip(run["tokens"], ref["tokens"], strict=False):
                if a != b:
                    break
                agree += 1
            run["agree_with_fp32"] = agree


def print_table(results: list[dict], new_tokens: int, prefill: int) -> None:
    table = Table(
        title=f"batch-1 greedy generation of {new_tokens} tokens, prefill of {prefill} tokens"
    )
    columns = ["config", "thr", "decode tok/s", "×fp32", "prefill tok/s", "×fp32", "peak RSS MB"]
    for column in [*columns, "above imports MB", "×fp32", "agree"]:
        table.add_column(column, justify="left" if column == "config" else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["name"], "", f"[red]error: {r['error'].splitlines()[-1][:90]}[/]")
            continue
        for run in r["runs"]:
            table.add_row(
                r["name"],
                str(run["threads"]),
                f"{run['decode_tokens_per_s']:.1f}",
                f"{run.get('decode_vs_fp32', float('nan')):.2f}",
                f"{run['prefill_tokens_per_s']:.0f}",
                f"{run.get('prefill_vs_fp32', float('nan')):.2f}",
                f"{r['peak_rss'] / 1e6:.0f}",
                f"{r['peak_rss_over_baseline'] / 1e6:.0f}",
                f"{r.get('peak_over_baseline_vs_fp32', float('nan')):.2f}",
                f"{run.get('agree_with_fp32', '')}/{run['new_tokens']}",
            )
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    env = environment(("torch", "transformers", "bitsandbytes", "numba"))
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        if args.quick:
            paths, inputs = quick_models(Path(tmp), args.configs, args.prefill)
        else:
            paths, inputs = real_models(args)
        results = []
        for name in args.configs:
            spec = {
                **spec_for(name, paths),
                **inputs,
                "name": name,
                "threads": parse_threads(args.threads),
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
            }
            console.log(f"{name}: running in a fresh process")
            result = run_config(spec, args.timeout)
            if "error" in result:
                console.log(f"[red]{name}: {result['error']}[/]")
            results.append(result)
    add_ratios(results)
    print_table(results, args.new_tokens, args.prefill)
    notes = {
        "nf4": "bitsandbytes Linear4bit NF4, double quantization, bf16 compute and bf16 rest",
        "ours": "calibrated BCQ, group 'auto'; q*-<head>: the LM head replaced (bench_lm_head)",
        "rss": (
            "peak_rss: VmHWM of a fresh process per config, imports included; "
            "peak_rss_over_baseline: minus the RSS after imports, before loading the model"
        ),
    }
    save_results(args.out, args, results, env=env, notes=notes)
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
