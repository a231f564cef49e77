"""Batched text generation from prompts, for scoring a tuned model on a task.

Two paths give the same answers: the decode engine (``alphatune.engine``: one native call per
token for all blocks, a static KV cache), used by default where it serves the model (quantized
Llama-family and Gemma-3 models on a CPU with a LUT kernel, greedy or sampling), and transformers
``generate`` for everything else (beam search, other architectures, unquantized models), chosen
with a logged reason. ``engine=False`` or ``ALPHATUNE_ENGINE=off`` forces transformers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from alphatune.data.tokenize import encode_prompt
from alphatune.engine import Engine, Sampling, generate_ids
from alphatune.errors import ConfigError, DataError, UnsupportedModelError
from alphatune.mixed import bank_for
from alphatune.models import model_device
from alphatune_runtime.generate import cut_at_stop

logger = logging.getLogger(__name__)

ENGINE_ENV = "ALPHATUNE_ENGINE"  # "auto" (default), "on" (required) or "off" (transformers)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``input_ids`` and ``attention_mask``, int64 (batch, longest)."""
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, longest - len(row) :] = 1
    return input_ids, attention_mask


def _first_line(text: str) -> str:
    """The generated answer: stripped text up to the first line break."""
    return text.strip().split("\n", 1)[0].strip()


def _answer_complete(stop: Sequence[str]) -> Callable[[str], bool]:
    """Whether a row's new text already fixes its answer: the first line has ended, or a stop
    string occurred. The engine stops such a row; more tokens could not change the answer."""

    def complete(text: str) -> bool:
        return "\n" in text.lstrip() or any(s in text for s in stop)

    return complete


def _engine_choice(engine: bool | None) -> bool | None:
    """True: the engine is required; None: used where it serves the model; False: never."""
    if engine is not None:
        return engine
    setting = os.environ.get(ENGINE_ENV, "").strip().lower() or "auto"
    if setting in ("auto",):
        return None
    if setting in ("on", "1", "true", "yes"):
        return True
    if setting in ("off", "0", "false", "no"):
        return False
    raise ConfigError(f"{ENGINE_ENV}={setting!r}; use auto, on or off")


def _longest_first(encoded: Sequence[Sequence[int]]) -> list[int]:
    # Longest first: a batch too large for memory fails at once, not at the end. Stable: prompts
    # of one length keep their order, so a run of this order decodes in the same batches again.
    return sorted(range(len(encoded)), key=lambda index: len(encoded[index]), reverse=True)


def generation_order(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """The order in which ``generate`` batches ``prompts`` (indices). Calling ``generate`` on
    consecutive slices of it, each a whole number of batches, gives the batches, and so the
    answers, of one call over all of them (what a resumable caller needs)."""
    return _longest_first([encode_prompt(tokenizer, prompt) for prompt in prompts])


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    batch_size: int = 8,
    adapters: Sequence[str | None] | None = None,
    progress: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop: Sequence[str] = (),
    engine: bool | None = None,
) -> list[str]:
    """Generate one answer per prompt: greedy (``num_beams == 1``), sampling, or beam search.

    Prompts are tokenized with :func:`alphatune.data.encode_prompt` (the ids training used) and
    sorted by length so each batch wastes little padding. Where the decode engine serves the
    model (see the module docstring) each batch runs there, every prompt at its own length;
    otherwise batches are left-padded and run through ``model.generate``. Only the new tokens
    are decoded; the answer is cut at the first stop string and at the first line break. The
    model is put in eval mode for the call and restored afterwards.

    With ``adapters``, each prompt runs with its own task adapter, in mixed batches: adapters
    resident on the model (:func:`alphatune.load_adapter` with ``adapter_name``, or
    :func:`alphatune.mixed.load_adapters`); every answer is the one that prompt gets alone with
    that adapter active.

    Args:
        model: a Hugging Face causal LM (anything with ``generate``).
        tokenizer: its tokenizer; needs an eos token (the pad token defaults to it).
        prompts: input texts, each non-empty after tokenization.
        max_new_tokens: most tokens generated per prompt.
        num_beams: 1 for greedy decoding, more for beam search (with early stopping).
        batch_size: prompts per ``generate`` call.
        adapters: one resident adapter name per prompt (``None``: the base), or ``None`` to use
            the model as it is (peft's ``adapter_names``).
        progress: show a transient rich progress bar.
        do_sample: sample instead of greedy decoding (``num_beams`` must be 1), with
            ``temperature``, ``top_k`` (None: all tokens) and ``top_p`` (None: no nucleus cut).
        seed: seeds the sampling; on the engine each prompt has its own generator
            (``seed + prompt index``), so its answer does not depend on the batch it ran in.
        stop: strings that end an answer (the answer is cut before the first one).
        engine: True requires the decode engine (``UnsupportedModelError`` says why it cannot
            serve), False uses transformers, None (default) reads ``ALPHATUNE_ENGINE``
            (``auto``: the engine where it serves the model, with a logged reason otherwise).

    Returns:
        One stripped string per prompt, in the order of ``prompts``.
    """
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise DataError(
            "batch_size, num_beams and max_new_tokens must be >= 1, got "
            f"{batch_size}, {num_beams}, {max_new_tokens}"
        )
    if do_sample and num_beams > 1:
        raise ConfigError("sampling with beam search is not supported; use num_beams=1")
    if isinstance(stop, str):
        raise ConfigError(f"stop must be a list of strings, got the string {stop!r}")
    if adapters is not None and len(adapters) != len(prompts):
        raise ConfigError(
            f"adapters must name one adapter per prompt: {len(prompts)} prompts, "
            f"{len(adapters)} adapters"
        )
    if not prompts:
        return []
    bank = None
    if adapters is not None:
        bank = bank_for(model, adapters)
        bank.indices(adapters)  # unknown names fail now, not after some batches
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos token; set tokenizer.eos_token first")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    for index, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"prompt {index} is empty after tokenization; give it some text")
    order = _longest_first(encoded)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": num_beams,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    if do_sample:
        options.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    if stop:
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    if num_beams > 1:
        options.update(early_stopping=True, no_repeat_ngram_size=0)
    device = model_device(model)
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            Progress(transient=True, disable=not progress) as bar,
        ):
            task = bar.add_task("generating", total=len(prompts))
            native = _build_engine(model, _engine_choice(engine), num_beams, bank is not None)
            if native is not None:
                sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
                for start in range(0, len(order), batch_size):
                    indices = order[start : start + batch_size]
                    rows = None if adapters is None else [adapters[i] for i in indices]
                    texts = _engine_batch(native, tokenizer, encoded, indices, max_new_tokens,
                                          sampling, None if bank is None else bank.indices(rows),
                                          stop)  # fmt: skip
                    for index, text in zip(indices, texts, strict=True):
                        answers[index] = text
                    bar.advance(task, len(indices))
                return answers
            if do_sample:
                torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                indices = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in indices], pad_id)
                # Beam search runs num_beams rows per prompt, the beams of a prompt adjacent.
                rows = (
                    nullcontext()
                    if bank is None or adapters is None
                    else bank.rows([adapters[i] for i in indices for _ in range(num_beams)])
                )
                with rows:
                    output = model.generate(  # type: ignore[operator]
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        **options,
                    )
                new_tokens = output[:, input_ids.shape[1] :]  # (batch, <= max_new_tokens)
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for index, text in zip(indices, texts, strict=True):
                    answers[index] = _first_line(cut_at_stop(text, stop))
                bar.advance(task, len(indices))
    finally:
        model.train(was_training)
    logger.debug("generated %d answers", len(answers))
    return answers


def _engine_batch(
    engine: Engine,
    tokenizer: Any,
    encoded: list[list[int]],
    indices: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    sets: torch.Tensor | None,
    stop: Sequence[str],
) -> list[str]:
    """The answers of prompts ``indices`` through the engine, in that order; a row stops once
    its answer is fixed (``_answer_complete``)."""
    finished = generate_ids(
        engine,
        [encoded[i] for i in indices],
        max_new_tokens=max_new_tokens,
        eos_ids=[tokenizer.eos_token_id],
        sampling=sampling,
        prompt_indices=indices,
        adapter_sets=None if sets is None else sets.tolist(),
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        stop=_answer_complete(stop),
    )
    texts = (tokenizer.decode(done.tokens, skip_special_tokens=True) for done in finished)
    return [_first_line(cut_at_stop(text, stop)) for text in texts]


def _build_engine(model: nn.Module, choice: bool | None, num_beams: int, mixed: bool) -> Any:
    """The decode engine for this call, or None (transformers generate) with the reason logged;
    with ``choice`` True a reason is an error instead."""
    if choice is False:
        return None
    try:
        if num_beams > 1:
            raise UnsupportedModelError(f"beam search (num_beams={num_beams})")
        engine = Engine.build(model, use_bank=mixed)
    except UnsupportedModelError as reason:
        if choice:
            raise UnsupportedModelError(
                f"the decode engine cannot serve this call: {reason}; use engine=None "
                f"(or {ENGINE_ENV}=auto) to fall back to transformers generate"
            ) from reason
        logger.info("generating with transformers generate, not the decode engine: %s", reason)
        return None
    logger.debug(
        "decode engine: %s kernel, %d blocks, %.1f MB of kernel operands",
        engine.kernel_name,
        engine.spec.shape.n_layers,
        engine.weights.nbytes() / 1e6,
    )
    return engine
