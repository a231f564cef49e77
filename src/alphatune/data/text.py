"""Raw text as one long token stream, for perplexity and calibration; where a file stops being UTF-8."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from alphatune.errors import DataError

logger = logging.getLogger(__name__)


def utf8_error(path: Path) -> str:
    """Where ``path`` first stops being UTF-8: ``"line N, byte M: reason"``.

    Readers decode in blocks, so the line they were on when decoding failed can be far from the
    bad byte; this reads the file once more to find the byte itself.
    """
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"line {line}, byte {err.start}: {err.reason}"
    return "no invalid byte found on a second read"


def load_text_tokens(
    tokenizer: Any, path: str | os.PathLike[str], max_tokens: int | None = None
) -> torch.LongTensor:
    """Tokenize a whole text file (e.g. WikiText-2 ``test.txt``, read as-is) into one stream.

    No BOS/EOS is added; line breaks stay in the text and are tokenized like any character.

    Args:
        tokenizer: a Hugging Face tokenizer.
        path: a UTF-8 text file.
        max_tokens: keep only the first ``max_tokens`` tokens; ``None`` keeps all.

    Returns:
        int64 tensor of shape (n_tokens,).
    """
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be None or >= 1, got {max_tokens}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file not found: {path}; expected a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({utf8_error(path)})") from err
    if not text.strip():
        raise DataError(f"{path}: file is empty; expected text to tokenize")
    # verbose=False: the "longer than model_max_length" warning is expected for a whole file.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    logger.debug("tokenized %s into %d tokens", path, len(ids))
    return torch.tensor(ids, dtype=torch.long)  # type: ignore[return-value]
