"""LM head and embedding options on SmolLM2: perplexity, sizes and (indicative) speed of each form.

For the unquantized fp32 model and for cached calibrated bases (``bases.py``), it changes the
head and embedding as each ``--heads`` entry says and measures WikiText-2 *test* perplexity with
the protocol of ``bench_quantization.py`` (first 8,192 tokens, context 512):

- ``keep``: the fp32 embedding and the head tied to it, as loaded;
- ``bf16``, ``bcqN``: the head replaced (a bf16 copy; N-bit calibrated BCQ, group "auto",
  calibrated on the head inputs of 32×512 tokens of WikiText-2 *valid*), the fp32 embedding kept;
- ``compact`` (the library default): the embedding and the tied head as one 8-bit BCQ table
  (``alphatune.embedding``).

``--forms`` measures other forms of the shared table instead (``8g576``: 8 bits, one group per
row; ``8g144i2``: groups of 144 refined by 2 rounds of alternating least squares; ``7g144``...):
the table's dense values are written into the tied fp32 weight, which computes what a compact
model with that table computes (up to summation order), and the perplexity is measured as above
(results in ``lm_head_forms.jsonl``, rendered into the same page).

Each record also holds the bytes of the head and of the embedding as stored, the whole model's,
the saved base's ``model.safetensors`` (quantized bases), the time of the head's product for one
token and of one embedding lookup (one thread; indicative on a busy machine), and what was
measured: commit, versions, machine, date. Results are appended to a JSONL file as they come (a
killed run resumes where it stopped) and rendered into docs/lm_head.md.

    .venv/bin/python benchmarks/bench_lm_head.py                       # fp32 and 3-bit bases
    .venv/bin/python benchmarks/bench_lm_head.py --bases 3 --heads keep compact
    .venv/bin/python benchmarks/bench_lm_head.py --forms 8g576 8g144i2 7g144
    .venv/bin/python benchmarks/bench_lm_head.py --render     # docs/lm_head.md from the results
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from bases import DEFAULT_CACHE, cached_base, calibration_tokens, parse_head
from common import append_record, environment, load_records, measured_on, time_ms

from alphatune import BCQConfig, bcq, kernels, quantize_lm_head
from alphatune.adapters import load_quantized, save_quantized
from alphatune.data import find_data_dir, load_text_tokens
from alphatune.embedding import BCQEmbedding, fit_table
from alphatune.evaluate import perplexity
from alphatune.files import BASE_WEIGHTS
from alphatune.fitting import fit_weight
from alphatune.lm_head import collect_head_hessian
from alphatune.models import load_model, load_tokenizer
from alphatune.quantize import summarize

RESULTS = Path(__file__).parent / "results" / "lm_head.jsonl"
FORMS_RESULTS = Path(__file__).parent / "results" / "lm_head_forms.jsonl"
DOCS = Path(__file__).parents[1] / "docs" / "lm_head.md"
COMMAND = ".venv/bin/python benchmarks/bench_lm_head.py"
GGUF_BYTES = 98_362_432  # the packaged SmolLM2-135M-Instruct.Q4_1.gguf the model comes from
PACKAGES = ("torch", "transformers", "numba", "safetensors")


def head_config(head: str) -> BCQConfig:
    """The config that turns a ``keep`` model into ``head`` (blocks are not touched)."""
    if head == "compact":
        return BCQConfig(method="calibrated", lm_head="compact", embedding="compact")
    mode, bits = parse_head(head)
    return BCQConfig(method="calibrated", lm_head=mode, lm_head_bits=bits, embedding="keep")


def git_commit() -> str:
    """HEAD, with ``+dirty`` when tracked files of the library or this script differ from it."""

    def run(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout

    dirty = run("status", "--porcelain", "--untracked-files=no", "--", "src", __file__).strip()
    return run("rev-parse", "HEAD").strip() + ("+dirty" if dirty else "")


def parse_form(text: str) -> tuple[int, int, int]:
    """``"8g144"`` or ``"8g144i2"`` -> ``(bits, group_size, iterations)``."""
    bits, _, rest = text.partition("g")
    group, _, iterations = rest.partition("i")
    if not (bits.isdigit() and group.isdigit() and (not iterations or iterations.isdigit())):
        raise ValueError(f"a form is BITSgGROUP[iITERATIONS], e.g. 8g144 or 8g144i2; got {text!r}")
    return int(bits), int(group), int(iterations or 0)


def dense_table(weight: torch.Tensor, form: str) -> tuple[torch.Tensor, int]:
    """The dense values of ``weight`` as a table of ``form``, and the table's stored bytes."""
    bits, group, iterations = parse_form(form)
    rows, dim = weight.shape
    if iterations == 0:
        packed, alpha, offset = fit_table(weight, bits, group)
        dense = kernels.dequantize_packed(
            packed, alpha.half().float(), offset.half().float(), group, dim
        )
    else:
        config = BCQConfig(bits=bits, group_size=group, method="offset", iterations=iterations)
        fitted = fit_weight(weight.float(), config, group)
        dense = bcq.dequantize(
            fitted.codes, fitted.alpha.half().float(), fitted.offset.half().float(), group
        )
    stored = bits * rows * ((dim + 7) // 8) + 2 * (bits + 1) * rows * (dim // group)
    return dense, stored


def render_forms(records: list[dict]) -> list[str]:
    if not records:
        return []
    lines = [
        "",
        "## Forms of the shared table",
        "",
        (
            "Other forms of one table for the embedding and the tied head, measured with "
            "`--forms` (the dense table written into the tied fp32 weight: what a compact model "
            "with that table computes). `8g144` is the default (`compact`, measured above); "
            "`i2`: 2 rounds of alternating least squares after round-to-nearest; `g576`: one "
            "group per row."
        ),
        "",
        "| base | form | table MB | perplexity | × keep |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['base']} | {r['form']} | {r['table_bytes'] / 1e6:.1f} | "
            f"{r['perplexity']:.3f} | {r['perplexity'] / r['keep_perplexity']:.4f}× |"
        )
    return lines


USAGE = """
## How it is stored and used

- Config: `BCQConfig(embedding="compact" | "keep", lm_head="compact" | "keep" | "bf16" | \
"bcq")`, both `compact` by default; `quantize_lm_head(model, config)` applies them to any model \
(`quantize_` calls it after the blocks). A tied head with a compact embedding becomes a \
`BCQHead` that uses the embedding's table (`alphatune.embedding`); an untied head, or one next \
to a kept embedding, gets its own table. What `compact` cannot handle (an embedding subclass \
with its own forward, a head that is not an `nn.Linear`) is kept, with the reason logged.
- Modules: `model.get_input_embeddings()` is a `BCQEmbedding` (`rows(ids)`: the float32 rows \
of any id tensor, only those dequantized; `forward` = `rows` times the model's embedding \
scale), `model.get_output_embeddings()` a `BCQHead` (`forward(hidden)`: logits; `.table` its \
`BCQTable`). Neither is a `BCQLinear`: never α-tuned, never in an adapter.
- Files (base format 3): `model.safetensors` holds `<embedding>.packed_codes` (uint8, \
8 × rows × dim/8), `.alpha` (fp16, 8 × rows × groups) and `.offset` (fp16); a head that shares \
the table has no tensors; an own table is `lm_head.own_table.*`. `config.json` records \
`input_embedding` (module, table shape, scale) and the head (`shares` or `table`). Bases of \
formats 1 and 2 (fp32 embedding, bf16/BCQ heads) load as before, with the fingerprints they \
had; the base fingerprint of a format-3 base also covers the embedding's table. A missing, \
corrupted or misshapen table tensor or record is an error naming the file and the tensor or \
record.
- Memory: the table is 35 MB resident (codes, and fp32 scales and offsets). Decoding through \
the LUT kernel adds the kernel's own layout of the codes (28 MB), as it does for every BCQ \
layer; reading the stored layout directly would remove that copy.
""".splitlines()


def _find(records: list[dict], base: str, head: str) -> dict | None:
    return next((r for r in records if r["base"] == base and r["head"] == head), None)


def render_choice(records: list[dict], forms: list[dict]) -> list[str]:
    """Why ``compact`` is the default, from the measurements (empty until they exist)."""
    lines = ["", "## Why `compact` is the default", ""]
    costs = []
    for base in ("q3", "fp32"):
        keep, compact = _find(records, base, "keep"), _find(records, base, "compact")
        if keep and compact:
            change = 100 * (compact["perplexity"] / keep["perplexity"] - 1)
            costs.append(f"{change:+.2f}% on `{base}`")
    q3 = _find(records, "q3", "compact")
    if not costs or q3 is None:
        return []
    table = q3["embedding_bytes"] / 1e6
    q3_keep = _find(records, "q3", "keep")
    if q3_keep is None:
        return []
    keep_saved = q3_keep["saved_bytes"]
    # The same base with the table in bf16 instead: half the fp32 embedding's bytes.
    bf16_saved = q3["saved_bytes"] - q3["embedding_bytes"] + q3_keep["embedding_bytes"] // 2
    lines.append(
        f"Perplexity: {' and '.join(costs)} (the budget is +0.1%). Memory: the 28.3M-entry matrix "
        f"is stored once, in {table:.1f} MB (8 bits per entry + fp16 scales and offsets per "
        "group of 144), instead of 113.2 MB in fp32; a `bf16` or `bcq` head is an untied copy "
        "next to the fp32 embedding (more memory, not less). The saved 3-bit base is "
        f"{q3['saved_bytes'] / 1e6:.1f} MB, under the {GGUF_BYTES / 1e6:.1f} MB Q4_1 GGUF it came "
        f"from (with the fp32 embedding: {keep_saved / 1e6:.0f} MB; with a bf16 table it would be "
        f"~{bf16_saved / 1e6:.0f} MB, still above it). No dense copy exists at load or run time: the lookup dequantizes the "
        "rows it reads; the head multiplies on the LUT kernel up to 64 tokens and dequantizes "
        "4,096 vocabulary rows at a time beyond (prefill, evaluation, training)."
    )
    within = [f["form"] for f in forms if f["perplexity"] / f["keep_perplexity"] <= 1.001]
    beyond = [
        f"`{f['form']}` on `{f['base']}` ({f['perplexity'] / f['keep_perplexity']:.4f}×)"
        for f in forms
        if f["perplexity"] / f["keep_perplexity"] > 1.001
    ]
    if forms:
        lines += [
            "",
            "Forms (table below): 8 bits with groups of 144 (`8g144`, round to nearest) is the "
            "smallest measured form within 0.1% on both bases; "
            + (f"over budget: {', '.join(beyond)}; " if beyond else "")
            + (f"within it: {', '.join(sorted(set(within)))}. " if within else "")
            + "Two rounds of alternating least squares (`i2`) cost a minute of fitting and did "
            "not measurably help at 8 bits, so the table is fitted by round to nearest "
            "(`embedding.fit_table`, ~3 s for SmolLM2).",
        ]
    keep = _find(records, "q3", "keep")
    bf16 = _find(records, "q3", "bf16")
    if keep:
        speed = (
            f"Speed (indicative, one thread, busy machine): the head's product for one token "
            f"took {q3['head_ms']:.1f} ms compact (8 bit planes on the LUT kernel) vs "
            f"{keep['head_ms']:.1f} ms fp32"
        )
        speed += f" and {bf16['head_ms']:.1f} ms bf16" if bf16 else ""
        speed += (
            f"; a lookup {q3['lookup_us']:.0f} µs vs {keep['lookup_us']:.0f} µs "
            "(nn.Embedding). For a quiet rerun: stop other work, then "
            "`taskset -c 1 .venv/bin/python benchmarks/bench_lm_head.py --bases 3 --heads keep "
            "bf16 compact --out /tmp/quiet.jsonl --docs /tmp/quiet.md`."
        )
        lines += ["", speed]
    return lines


def render(records: list[dict], settings: dict) -> str:
    keep = {r["base"]: r["perplexity"] for r in records if r["head"] == "keep"}
    lines = [
        "# LM head and embedding options on SmolLM2-135M-Instruct",
        "",
        (
            "WikiText-2 test perplexity (first "
            f"{settings['eval_tokens']:,} tokens, context 512) with the LM head and the input "
            "embedding as loaded (`keep`: fp32, tied), the head replaced by a bf16 copy or N-bit "
            "BCQ (calibrated, group 144, "
            f"{settings['calibration_sequences']}×512 tokens of WikiText-2 *valid*; the fp32 "
            "embedding stays for the lookup), or both as one 8-bit BCQ table (`compact`, the "
            'default since format 3: `BCQConfig(embedding="compact", lm_head="compact")`). '
            "`q3` is the 3-bit calibrated base of `bench_quantization.py` (blocks only). The "
            "head and embedding are one 49,152×576 matrix (28.3M of the model's 134.5M "
            "parameters)."
        ),
        "",
        (
            "*head MB* and *embedding MB* are as stored (a head that shares the embedding's table "
            "adds nothing); *base MB* is the saved `model.safetensors` (the packaged Q4_1 GGUF "
            f"is {GGUF_BYTES / 1e6:.1f} MB); *head ms* is one token's logits, *lookup µs* one "
            "token's embedding row, both on one thread (indicative: measured while other work "
            "ran; see the load average in the results file)."
        ),
        "",
        f"Reproduce: `{settings['command']}` (results in `benchmarks/results/lm_head.jsonl`).",
        "",
        (
            "| base | head | embedding | head MB | embedding MB | base MB | perplexity | × keep "
            "| head ms | lookup µs |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ratio = r["perplexity"] / keep[r["base"]] if r["base"] in keep else float("nan")
        base_mb = f"{r['saved_bytes'] / 1e6:.1f}" if r.get("saved_bytes") else "–"
        lines.append(
            f"| {r['base']} | {r['head']} | {r['embedding']} | {r['head_bytes'] / 1e6:.1f} | "
            f"{r['embedding_bytes'] / 1e6:.1f} | {base_mb} | {r['perplexity']:.3f} | "
            f"{ratio:.4f}× | {r['head_ms']:.2f} | {r['lookup_us']:.0f} |"
        )
    envs = [r["environment"] for r in records if "environment" in r]
    if envs:
        first, last = envs[0], envs[-1]
        lines += [
            "",
            (
                f"Measured {first['date']} to {last['date']} at commit `{last['commit']}` on "
                f"{last['processor']} ({last['cpu_count']} CPUs), torch {last.get('torch')}, "
                f"transformers {last.get('transformers')}, numba {last.get('numba')}."
            ),
        ]
    forms = load_records(settings.get("forms_out", FORMS_RESULTS))
    lines += render_choice(records, forms)
    lines += USAGE
    lines += render_forms(forms)
    lines += ["", measured_on(records + forms), ""]
    return "\n".join(lines)


def head_bytes(model: torch.nn.Module) -> int:
    """Bytes of the head as stored: a replaced head's own (0 when it shares the embedding's
    table), else the fp32 weight (tied to the embedding or not)."""
    summary = summarize(model)
    if summary.lm_head != "keep":
        return summary.lm_head_bytes
    weight = model.get_output_embeddings().weight
    return weight.numel() * weight.element_size()


def embedding_bytes(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings()
    if isinstance(embedding, BCQEmbedding):
        return embedding.storage_bytes()
    return embedding.weight.numel() * embedding.weight.element_size()


def saved_bytes(model: torch.nn.Module, config: BCQConfig) -> int:
    """Size of ``model.safetensors`` when the model is saved as a base."""
    with tempfile.TemporaryDirectory(prefix="alphatune-bench-") as directory:
        save_quantized(model, Path(directory) / "base", config)
        return (Path(directory) / "base" / BASE_WEIGHTS).stat().st_size


def speeds(model: torch.nn.Module) -> tuple[float, float]:
    """(head ms for one token, embedding lookup µs for one token), one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        hidden = torch.randn(1, 1, head.in_features)
        ids = torch.tensor([[1234]])
        with torch.inference_mode():
            head_ms = time_ms(lambda: head(hidden), repeat=50, budget_s=5)
            lookup_ms = time_ms(lambda: embedding(ids), repeat=200, budget_s=2)
    finally:
        torch.set_num_threads(threads)
    return head_ms, lookup_ms * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="+", default=["fp32", "3"], help="fp32 and/or bit widths")
    parser.add_argument("--heads", nargs="+", default=["keep", "bf16", "bcq4", "bcq8", "compact"])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--rebuild", action="store_true", help="re-quantize cached bases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--forms", nargs="+", help="measure these table forms (see the docstring)")
    parser.add_argument("--forms-out", type=Path, default=FORMS_RESULTS)
    parser.add_argument("--render", action="store_true", help="only re-render --docs")
    args = parser.parse_args()
    settings = {
        "eval_tokens": args.eval_tokens,
        "calibration_sequences": args.calibration_sequences,
        "command": COMMAND,
        "forms_out": args.forms_out,
    }
    if args.render:
        args.docs.write_text(render(load_records(args.out), settings))
        return

    tokenizer = load_tokenizer()
    eval_tokens = load_text_tokens(
        tokenizer, find_data_dir() / "wikitext-2" / "test.txt", max_tokens=args.eval_tokens
    )
    calibration = calibration_tokens(args.calibration_sequences)
    records = load_records(args.out)
    done = {(r["base"], r["head"]) for r in records}

    def record(entry: dict) -> None:
        append_record(records, entry, args.out, args.docs, partial(render, settings=settings))

    if args.forms:
        measure_forms(args, eval_tokens, records, settings)
        return

    for base in args.bases:
        name = "fp32" if base == "fp32" else f"q{int(base)}"
        todo = [h for h in args.heads if (name, h) not in done]
        if not todo:
            continue
        if base == "fp32":
            load = load_model
        else:
            path = cached_base(
                int(base),
                cache=args.cache_dir,
                calibration_sequences=args.calibration_sequences,
                rebuild=args.rebuild,
            )

            def load(path: Path = path) -> torch.nn.Module:
                model = load_quantized(path)[0]
                if isinstance(model.get_input_embeddings(), BCQEmbedding):
                    raise SystemExit(
                        f"{path} has a compact embedding; this benchmark starts from a base whose "
                        "embedding and head are kept (fp32): rebuild it with lm_head and "
                        "embedding 'keep'"
                    )
                return model

        hessian = None
        if any(h.startswith("bcq") for h in todo):
            hessian = collect_head_hessian(load(), calibration)  # once per base, for every head
        for head in todo:
            model = load()
            config = head_config(head)
            began = time.perf_counter()
            quantize_lm_head(model, config, hessian=hessian)
            seconds = time.perf_counter() - began
            env = environment(PACKAGES)  # after the fit, before the timed work
            env["commit"] = git_commit()
            value = perplexity(model, eval_tokens, progress=False)
            head_ms, lookup_us = speeds(model)
            record(
                {
                    "base": name,
                    "head": head,
                    "embedding": config.embedding.value,
                    "perplexity": value,
                    "head_bytes": head_bytes(model),
                    "embedding_bytes": embedding_bytes(model),
                    "model_bytes": summarize(model).model_bytes,
                    "saved_bytes": None if base == "fp32" else saved_bytes(model, config),
                    "head_seconds": seconds,
                    "head_ms": head_ms,
                    "lookup_us": lookup_us,
                    "eval_tokens": args.eval_tokens,
                    "environment": env,
                }
            )


def measure_forms(
    args: argparse.Namespace, eval_tokens: torch.Tensor, records: list[dict], settings: dict
) -> None:
    """Perplexity of each table form in ``args.forms`` on each base (see the docstring)."""
    forms = load_records(args.forms_out)
    done = {(r["base"], r["form"]) for r in forms}

    def page(_: list[dict]) -> str:
        return render(load_records(args.out), settings)  # the other sweep may be running too

    for base in args.bases:
        name = "fp32" if base == "fp32" else f"q{int(base)}"
        todo = [f for f in args.forms if (name, f) not in done]
        if not todo:
            continue
        if base == "fp32":
            model = load_model()
        else:
            path = cached_base(int(base), cache=args.cache_dir, rebuild=args.rebuild)
            model = load_quantized(path)[0]
        weight = model.get_input_embeddings().weight
        if model.get_output_embeddings().weight is not weight:
            raise SystemExit("--forms needs a model whose head is tied to its fp32 embedding")
        original = weight.detach().clone()
        keep = perplexity(model, eval_tokens, progress=False)
        for form in todo:
            dense, stored = dense_table(original, form)
            with torch.no_grad():
                weight.copy_(dense)
            env = environment(PACKAGES)
            env["commit"] = git_commit()
            entry = {
                "base": name,
                "form": form,
                "perplexity": perplexity(model, eval_tokens, progress=False),
                "keep_perplexity": keep,
                "table_bytes": stored,
                "eval_tokens": args.eval_tokens,
                "environment": env,
            }
            with torch.no_grad():
                weight.copy_(original)
            append_record(forms, entry, args.forms_out, args.docs, page)


if __name__ == "__main__":
    main()
