"""Peak memory of getting a quantized model: quantize-on-load vs load-fp32-then-quantize (issue 14).

Each configuration runs in a fresh process of its own (this script started again with
``--worker``), which reads its resident memory from ``/proc/self/status`` after the imports
(``torch``, ``transformers``, ``alphatune``) and, at the end, its peak (``VmHWM``); "above
imports" = peak - after imports. The kernel's peak counts the pages of the memory-mapped
checkpoint that loading reads through (file pages, reclaimable), so the peak of the memory the
process allocated (``RssAnon``, sampled every 5 ms) is recorded too. Per model (SmolLM2-135M, the default; Gemma-3-270M from its
packaged GGUF with ``--models gemma-3-270m``, which needs the ``gemma`` extra):

- ``quantize-on-load``: ``AutoModelForCausalLM.from_pretrained(model_dir,
  quantization_config=BCQConfig(...))``: each linear layer is quantized as it arrives, so only
  one full-precision layer exists at a time (the embedding and head arrive in full and are made
  compact after loading);
- ``fp32-then-quantize``: ``from_pretrained(model_dir)`` in fp32, then ``alphatune.quantize_``;
- ``saved-base``: ``from_pretrained(saved_base_dir)`` of the base the first configuration saved
  (what a user pays to load a base that exists).

The method is the data-free ``offset`` (3 bits, the default group size and compact embedding and
head): quantize-on-load serves data-free methods; the calibrated default needs the whole model
for its calibration pass (docs/hf.md). Results: ``benchmarks/results/load_memory.json`` (commit,
versions, machine, date, the CPU share other processes used). Memory does not depend on a quiet
machine; the seconds do (see ``busy``).

Usage::

    python benchmarks/bench_load_memory.py                       # SmolLM2
    python benchmarks/bench_load_memory.py --models smollm2-135m-instruct gemma-3-270m
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proc_status import status_kib

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "load_memory.json"
CONFIGS = ("quantize-on-load", "fp32-then-quantize", "saved-base")
PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "numba")


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, MiB."""
    return {k: v // 1024 for k, v in status_kib("VmRSS", "VmHWM", "RssAnon", "RssFile").items()}


class _AnonPeak:
    """The peak of ``RssAnon`` (memory the process allocated, not file pages it mapped), sampled
    every 5 ms on a thread: the kernel keeps a peak only of the whole RSS (``VmHWM``), which
    also counts the pages of a memory-mapped checkpoint that loading reads through."""

    def __init__(self) -> None:
        import threading

        self.peak = _status()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status()["RssAnon"])

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status()["RssAnon"])


def worker(model: str, config: str, base_dir: Path, threads: int) -> dict[str, Any]:
    """Run one configuration in this process and measure it."""
    import torch
    import transformers  # noqa: F401  (counted in the imports, as alphatune imports it)

    import alphatune
    from alphatune import BCQConfig
    from alphatune.models import local_model_dir

    torch.set_num_threads(threads)
    model_dir = local_model_dir(model)  # converts a packaged model once (before the measurement)
    assert model_dir is not None, model
    from transformers import AutoModelForCausalLM

    at_imports = _status()
    imports = at_imports["VmRSS"]
    anon = _AnonPeak()
    bcq = BCQConfig(bits=3, method="offset")
    start = time.perf_counter()
    if config == "quantize-on-load":
        loaded = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bcq)
    elif config == "fp32-then-quantize":
        loaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        alphatune.quantize_(loaded, bcq)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(base_dir)
    seconds = time.perf_counter() - start
    with torch.inference_mode():  # the model works: one forward
        loaded(input_ids=torch.tensor([[1, 2, 3, 4]]))
    end = _status()
    anon_peak = anon.stop()
    if config == "quantize-on-load" and not base_dir.exists():
        loaded.save_pretrained(base_dir)  # for saved-base, after the measurement
    return {
        "model": model,
        "config": config,
        "seconds": round(seconds, 2),
        "rss_after_imports_mib": imports,
        "rss_end_mib": end["VmRSS"],
        "peak_mib": end["VmHWM"],
        "peak_above_imports_mib": end["VmHWM"] - imports,
        "anon_peak_above_imports_mib": anon_peak - at_imports["RssAnon"],
        "file_rss_end_mib": end["RssFile"],
        "fingerprint": alphatune.base_fingerprint(loaded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "CONFIG", "BASE_DIR"))
    args = parser.parse_args()
    if args.worker:
        model, config, base_dir = args.worker
        print(json.dumps(worker(model, config, Path(base_dir), args.threads)))
        return

    sys.path.insert(0, str(HERE))
    from common import CpuWatch, environment

    results = []
    watch = CpuWatch()
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            base_dir = Path(scratch) / f"{model}-base"
            for config in CONFIGS:
                done = subprocess.run(
                    [sys.executable, __file__, "--threads", str(args.threads),
                     "--worker", model, config, str(base_dir)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if done.returncode:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"{model} / {config} failed (exit {done.returncode})")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"{model:24s} {config:20s} peak above imports {row['peak_above_imports_mib']:5d}"
                    f" MiB (allocated {row['anon_peak_above_imports_mib']:5d} MiB),"
                    f" {row['seconds']:6.1f} s"
                )
                results.append(row)
    others = watch.stop()
    env = environment(PACKAGES) | others.record()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": env, "args": {"models": args.models, "threads": args.threads},
               "results": results}  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}" + (f"; {others.warning()}" if others.busy else ""))


if __name__ == "__main__":
    main()
