"""Steps shared by the command line and scripts: locating data, calibration batches, task scoring."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from alphatune.data import EvalItem, encode_prompt, load_text_tokens
from alphatune.errors import DataError
from alphatune.evaluate import bootstrap_interval, corpus_bleu, generate

DATA_ENV = "ALPHATUNE_DATA_DIR"

# Default files inside the shared data directory, per task and role.
DEFAULT_FILES = {
    ("e2e", "train"): "e2e/train.csv",
    ("e2e", "dev"): "e2e/dev.csv",
    ("e2e", "test"): "e2e/test.csv",
    ("triples", "train"): "webnlg/train.jsonl",
    ("triples", "dev"): "webnlg/dev.jsonl",
    ("triples", "test"): "webnlg/test.jsonl",
    ("calibration", "text"): "wikitext-2/valid.txt",
}


def find_data_dir() -> Path:
    """The shared data directory: ``$ALPHATUNE_DATA_DIR``, else ``./shared/data`` or ``../shared/data``."""
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(
        "no data directory found: pass the file explicitly (--data FILE) or set "
        f"{DATA_ENV} to the folder holding e2e/, webnlg/ and wikitext-2/"
    )


def default_file(task: str, role: str) -> Path:
    """Default data file for ``task`` (``e2e``, ``triples``, ``calibration``) and role."""
    relative = DEFAULT_FILES.get((task, role))
    if relative is None:
        raise DataError(f"no default {role} file for task {task!r}; pass --data FILE")
    path = find_data_dir() / relative
    if not path.is_file():
        raise DataError(
            f"default {role} file for task {task!r} not found at {path}; pass it explicitly"
        )
    return path


def calibration_batch(
    tokenizer: Any, path: str | os.PathLike[str], sequences: int, length: int
) -> Tensor:
    """``(sequences, length)`` token ids cut from the start of a text file (for calibration)."""
    tokens = load_text_tokens(tokenizer, path, max_tokens=sequences * length)
    if tokens.numel() < sequences * length:
        raise DataError(
            f"{path} has only {tokens.numel()} tokens; {sequences}×{length} are needed for "
            "calibration (use fewer --calibration-sequences or a longer file)"
        )
    return tokens[: sequences * length].reshape(sequences, length)


def context_length(model: nn.Module) -> int | None:
    """Most positions the model handles (``config.max_position_embeddings``); ``None``: unknown."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def check_prompt_lengths(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> None:
    """Raise unless every prompt plus ``max_new_tokens`` fits the model's context window.

    Past its position table a model runs slowly and returns garbage or nothing; saying so up
    front beats minutes of generation.
    """
    context = context_length(model)
    if context is None:
        return
    for index, prompt in enumerate(prompts):
        length = len(encode_prompt(tokenizer, prompt))
        if length + max_new_tokens > context:
            raise DataError(
                f"prompt {index} has {length} tokens; with {max_new_tokens} new tokens that "
                f"exceeds the model's context of {context} tokens. Shorten the prompt or "
                "lower --max-new-tokens"
            )


@dataclass
class TaskScore:
    """BLEU of generated text against the references, its bootstrap 95% interval over items,
    and the generations."""

    bleu: float
    predictions: list[str]
    items: int
    bleu_interval: tuple[float, float] = (float("nan"), float("nan"))


def score_generation(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[EvalItem],
    *,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> TaskScore:
    """Generate for every item and score corpus BLEU against its references."""
    check_prompt_lengths(model, tokenizer, [item.prompt for item in items], max_new_tokens)
    predictions = generate(
        model,
        tokenizer,
        [item.prompt for item in items],
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        batch_size=batch_size,
        progress=progress,
    )
    references = [item.references for item in items]
    bleu = corpus_bleu(predictions, references)
    interval = bootstrap_interval(predictions, references, samples=1000, seed=0)
    return TaskScore(bleu=bleu, predictions=predictions, items=len(items), bleu_interval=interval)
