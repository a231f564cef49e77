"""Quantized SmolLM2 bases for the benchmarks, built once and cached.

Quantizing SmolLM2 with the calibrated method takes minutes, so ``cached_base`` saves every base it
builds with ``save_quantized`` under a cache directory (default ``~/.cache/alphatune/bench``) and
loads it from there afterwards. One directory per setting:

    smollm2-q3              3-bit calibrated blocks (group "auto"), the head kept
    smollm2-q3-head-bf16    the same blocks with a bf16 head
    smollm2-q3-head-bcq4    the same blocks with a 4-bit calibrated BCQ head

A cached base is reused only if its ``quantization_config`` matches the request; pass
``rebuild=True`` (``--rebuild`` in the scripts) after changing the quantizer.

``tiny_quick_base`` is the base of the scripts' ``--quick`` smoke runs: a tiny random Llama,
quantized in seconds and never cached.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alphatune import BCQConfig, quantize_, quantize_lm_head
from alphatune.adapters import load_quantized, save_quantized
from alphatune.data import calibration_batch, find_data_dir
from alphatune.models import cache_dir, load_model, load_tokenizer

DEFAULT_CACHE = cache_dir() / "bench"
CALIBRATION_LENGTH = 512
SETTINGS = "bench_settings.json"
QUICK_CONFIG = BCQConfig(bits=3, group_size=32, method="offset")
QUICK_DESCRIPTION = "tiny random Llama, 3 bits (quick)"


def parse_head(text: str) -> tuple[str, int]:
    """``"keep"``, ``"bf16"`` or ``"bcqN"`` (N bits) -> ``(mode, bits)``."""
    if text in ("keep", "bf16"):
        return text, 4
    if text.startswith("bcq") and text[3:].isdigit():
        return "bcq", int(text[3:])
    raise ValueError(f"head must be keep, bf16 or bcqN (e.g. bcq4), got {text!r}")


def base_config(bits: int, head: str = "keep") -> BCQConfig:
    mode, head_bits = parse_head(head)
    return BCQConfig(bits=bits, method="calibrated", lm_head=mode, lm_head_bits=head_bits)


def calibration_tokens(sequences: int):
    """``(sequences, 512)`` token ids from the start of WikiText-2 *valid* (as bench_quantization)."""
    path = find_data_dir() / "wikitext-2" / "valid.txt"
    return calibration_batch(load_tokenizer(), path, sequences, CALIBRATION_LENGTH)


def _matches(directory: Path, config: BCQConfig, head: str, sequences: int) -> bool:
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    q = data.get("quantization_config", {})
    mode, head_bits = parse_head(head)
    layer = q.get("layers", {}).get(q.get("head", {}).get("module", ""), {})
    return (
        q.get("bits") == config.bits
        and q.get("method") == config.method.value
        and q.get("group_size") == config.group_size
        and q.get("lm_head", "keep") == mode
        and (mode != "bcq" or layer.get("bits") == head_bits)
        and _settings(directory).get("calibration_sequences") == sequences
    )


def _settings(directory: Path) -> dict:
    try:
        return json.loads((directory / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def cached_base(
    bits: int,
    head: str = "keep",
    *,
    cache: Path = DEFAULT_CACHE,
    calibration_sequences: int = 32,
    rebuild: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Directory of a saved SmolLM2 base: ``bits``-bit calibrated blocks with ``head``.

    A head variant is built from the cached block base (so every head shares the same blocks).
    """
    config = base_config(bits, head)
    name = f"smollm2-q{bits}" + ("" if head == "keep" else f"-head-{head}")
    directory = cache / name
    if not rebuild and _matches(directory, config, head, calibration_sequences):
        return directory
    calibration = calibration_tokens(calibration_sequences)
    if head == "keep":
        log(f"quantizing SmolLM2 to {bits} bits (calibrated; minutes) -> {directory}")
        model, tokenizer = load_model(), load_tokenizer()
        quantize_(model, config, calibration=calibration)
    else:
        model, tokenizer = load_quantized(
            cached_base(bits, cache=cache, calibration_sequences=calibration_sequences, log=log)
        )
        log(f"replacing the head of the {bits}-bit base: {head} -> {directory}")
        quantize_lm_head(model, config, calibration=calibration)
    save_quantized(model, directory, config, tokenizer, overwrite=True)
    # What the base's own config does not record, for _matches.
    (directory / SETTINGS).write_text(json.dumps({"calibration_sequences": calibration_sequences}))
    return directory


def tiny_quick_base() -> tuple[Any, Any]:
    """``(model, tokenizer)``: the ``--quick`` base, quantized with ``QUICK_CONFIG``.

    A seeded random Llama (2 blocks, hidden 64) with SmolLM2's tokenizer and vocabulary, in eval
    mode: speed and sizes of a smoke run mean nothing, it only shows that a script runs.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    quantize_(model, QUICK_CONFIG)
    return model, tokenizer
