"""Perplexity of a causal LM over a token stream (e.g. WikiText-2)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from alphatune.errors import DataError
from alphatune.models import model_device

logger = logging.getLogger(__name__)


def perplexity(
    model: nn.Module,
    tokens: torch.LongTensor,
    context: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    prefix: Sequence[int] = (),
) -> float:
    """Perplexity over non-overlapping windows of ``context`` tokens.

    The stream is cut into windows of ``context - len(prefix)`` tokens (a shorter tail is
    dropped), each fed to the model after ``prefix``; within each window every token but the
    first is predicted from the ones before it (and the prefix). The result is ``exp`` of the
    mean negative log-likelihood over all predicted tokens, computed in float32. The model is put
    in eval mode for the call and restored afterwards.

    Args:
        model: a causal LM whose output has ``.logits`` of shape (batch, context, vocab).
        tokens: int64 token ids of shape (n_tokens,), n_tokens >= context - len(prefix).
        context: tokens per forward pass, prefix included; at least ``len(prefix) + 2``.
        batch_size: windows per forward pass.
        progress: show a transient rich progress bar.
        prefix: ids put before every window and never scored: the BOS for a model trained to
            see one first (``alphatune.data.start_ids(tokenizer)``; Gemma-3's perplexity without
            it is ~4x higher). Empty (the default) for SmolLM2.

    Returns:
        The perplexity, >= 1.
    """
    if tokens.dim() != 1:
        raise DataError(f"tokens must be 1-D (n_tokens,), got shape {tuple(tokens.shape)}")
    width = context - len(prefix)  # stream tokens per window
    if width < 2 or batch_size < 1:
        raise DataError(
            f"context must be >= {len(prefix) + 2} (a prefix of {len(prefix)} and two tokens) "
            f"and batch_size >= 1, got {context}, {batch_size}"
        )
    n_windows = tokens.numel() // width
    if n_windows == 0:
        raise DataError(
            f"{tokens.numel()} tokens give no full window of {width}; pass more tokens "
            "or a smaller context"
        )
    windows = tokens[: n_windows * width].view(n_windows, width)  # (windows, width)
    start = torch.tensor(list(prefix), dtype=torch.long)  # (len(prefix),)
    device = model_device(model)
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task("perplexity", total=n_windows)
            for first in range(0, n_windows, batch_size):
                batch = windows[first : first + batch_size]  # (b, width)
                ids = torch.cat([start.expand(batch.shape[0], -1), batch], dim=1).to(device)
                # (b, width - 1, vocab): the predictions of the window's tokens after its first
                logits = model(input_ids=ids).logits[:, len(prefix) : -1].float()
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    batch[:, 1:].reshape(-1).to(device),
                    reduction="sum",
                )
                total_nll += nll.item()
                bar.advance(task, batch.shape[0])
    finally:
        model.train(was_training)
    mean_nll = total_nll / (n_windows * (width - 1))
    logger.debug("mean NLL %.4f over %d windows of %d", mean_nll, n_windows, context)
    return math.exp(mean_nll)
