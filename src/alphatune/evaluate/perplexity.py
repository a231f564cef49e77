"""Perplexity of a causal LM over a token stream (e.g. WikiText-2)."""

from __future__ import annotations

import logging
import math

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
) -> float:
    """Perplexity over non-overlapping windows of ``context`` tokens.

    The stream is cut into ``len(tokens) // context`` windows (a shorter tail is dropped); within
    each window every token but the first is predicted from the ones before it. The result is
    ``exp`` of the mean negative log-likelihood over all predicted tokens, computed in float32.
    The model is put in eval mode for the call and restored afterwards.

    Args:
        model: a causal LM whose output has ``.logits`` of shape (batch, context, vocab).
        tokens: int64 token ids of shape (n_tokens,), n_tokens >= context.
        context: window length, >= 2.
        batch_size: windows per forward pass.
        progress: show a transient rich progress bar.

    Returns:
        The perplexity, >= 1.
    """
    if tokens.dim() != 1:
        raise DataError(f"tokens must be 1-D (n_tokens,), got shape {tuple(tokens.shape)}")
    if context < 2 or batch_size < 1:
        raise DataError(f"context must be >= 2 and batch_size >= 1, got {context}, {batch_size}")
    n_windows = tokens.numel() // context
    if n_windows == 0:
        raise DataError(
            f"{tokens.numel()} tokens give no full window of {context}; pass more tokens "
            "or a smaller context"
        )
    windows = tokens[: n_windows * context].view(n_windows, context)  # (windows, context)
    device = model_device(model)
    total_nll = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), Progress(transient=True, disable=not progress) as bar:
            task = bar.add_task("perplexity", total=n_windows)
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)  # (b, context)
                logits = model(input_ids=batch).logits[:, :-1].float()  # (b, context-1, vocab)
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += nll.item()
                bar.advance(task, batch.shape[0])
    finally:
        model.train(was_training)
    mean_nll = total_nll / (n_windows * (context - 1))
    logger.debug("mean NLL %.4f over %d windows of %d", mean_nll, n_windows, context)
    return math.exp(mean_nll)
