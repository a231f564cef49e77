"""What the commands read: a quantized base (with an adapter), and the inputs that an output must
never replace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alphatune.cli.console import timed_step
from alphatune.errors import ConfigError


def existing_inputs(*paths: Any) -> list[Path]:
    """The local files and directories among ``paths`` (what an output must never replace)."""
    return [Path(p) for p in paths if p is not None and Path(p).exists()]


def load_base(base: Path, adapter: Path | None) -> tuple[Any, Any]:
    """The model and tokenizer saved in ``base``, with ``adapter`` loaded when given."""
    from alphatune.adapters import load_adapter
    from alphatune.bases import load_quantized

    with timed_step(f"loading base {base}" + (f" + adapter {adapter}" if adapter else "")):
        model, tokenizer = load_quantized(base)
        if tokenizer is None:
            raise ConfigError(f"{base} holds no tokenizer; re-create it with 'alphatune quantize'")
        if adapter is not None:
            load_adapter(model, adapter)
    return model, tokenizer
