"""The quantized bases of the grid before any tuning: their WikiText-2 perplexity and size.

Every base the grid caches (``methods.cached_base``) is measured once, the unquantized model
beside them, on the first ``EVAL_TOKENS`` tokens of WikiText-2 *test* (context 512, the
protocol of ``benchmarks/bench_quantization.py``; calibration reads WikiText-2 *valid*). The
measurements go to ``<results>/bases.json``, keyed by the base's directory name and the record
of where it was quantized, so a base quantized again is measured again. ``report`` renders them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from alphatune.experiments.methods import bases_dir, made_record
from alphatune.experiments.spec import environment, write_json

logger = logging.getLogger(__name__)

EVAL_TOKENS = 8192
RESULTS_FILE = "bases.json"
UNQUANTIZED = "fp32"


def _wikitext_tokens(tokenizer: Any) -> Any:
    from alphatune.data import find_data_dir, load_text_tokens

    path = find_data_dir() / "wikitext-2" / "test.txt"
    return load_text_tokens(tokenizer, path, max_tokens=EVAL_TOKENS)


def _measure(model: Any, tokenizer: Any) -> dict[str, Any]:
    from alphatune.evaluate import perplexity

    return {"wikitext2_perplexity": perplexity(model, _wikitext_tokens(tokenizer), progress=False)}


def _base_entry(directory: Path) -> dict[str, Any]:
    from alphatune.adapters import load_quantized
    from alphatune.bases import base_fingerprint, bcq_config
    from alphatune.quantize import summarize

    model, tokenizer = load_quantized(directory)
    qconfig = json.loads((directory / "config.json").read_text())["quantization_config"]
    config = bcq_config(qconfig, str(directory))
    summary = summarize(model)
    return {
        "bits": config.bits,
        "method": config.method.value,
        "layer_bits": [list(pair) for pair in config.layer_bits],
        "fingerprint": base_fingerprint(model),
        "bits_per_weight": summary.bits_per_weight,
        "stored_bytes": summary.model_bytes,
        **_measure(model, tokenizer),
    }


def measure_bases(results_dir: Path, model_name: str) -> dict[str, Any]:
    """Measure every cached base not measured yet (and the unquantized ``model_name`` once);
    returns the file's content."""
    from alphatune.models import load_model, load_tokenizer

    path = results_dir / RESULTS_FILE
    data = json.loads(path.read_text()) if path.exists() else {"eval_tokens": EVAL_TOKENS}
    entries: dict[str, Any] = data.setdefault("bases", {})
    if UNQUANTIZED not in entries:
        logger.info("measuring the unquantized model")
        entries[UNQUANTIZED] = {
            **_measure(load_model(model_name), load_tokenizer(model_name)),
            "environment": environment(),
        }
        write_json(path, data)
    directories = sorted(d for d in bases_dir().glob("*") if (d / "config.json").exists())
    for directory in directories:
        made = made_record(directory)
        if directory.name in entries and entries[directory.name].get("quantized") == made:
            continue
        logger.info("measuring base %s", directory.name)
        entries[directory.name] = {
            **_base_entry(directory),
            "quantized": made,
            "environment": environment(),
        }
        write_json(path, data)  # after each base: a killed run keeps what it measured
    return data


def bases_table(data: dict[str, Any]) -> str:
    """Markdown: each base's bits, size and WikiText-2 perplexity against the unquantized one."""
    entries = data.get("bases", {})
    reference = entries.get(UNQUANTIZED, {}).get("wikitext2_perplexity")
    titles = ["base", "bits", "layers at other bits", "bits / weight", "stored MiB",
              "WikiText-2 perplexity", "× unquantized", "commit"]  # fmt: skip
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    if reference is not None:
        commit = str(entries[UNQUANTIZED]["environment"].get("commit", "?"))[:8]
        cells = [UNQUANTIZED, "32", "–", "32", "–", f"{reference:.2f}", "1.00×", commit]
        lines.append("| " + " | ".join(cells) + " |")
    for name, entry in sorted((n, e) for n, e in entries.items() if n != UNQUANTIZED):
        value = entry["wikitext2_perplexity"]
        mixed = ", ".join(f"`{p}` {b}" for p, b in entry["layer_bits"]) or "–"
        ratio = f"{value / reference:.2f}×" if reference else "?"
        cells = [name, str(entry["bits"]), mixed, f"{entry['bits_per_weight']:.2f}",
                 f"{entry['stored_bytes'] / 2**20:.1f}", f"{value:.2f}", ratio,
                 str(entry["environment"].get("commit", "?"))[:8]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
