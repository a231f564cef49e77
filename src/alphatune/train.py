"""The AlphaTuning training loop: causal-LM loss on target tokens, AdamW, linear decay with warm-up.

Checkpoints hold only what trains (the scales), the optimizer state and the position in the data,
as safetensors + JSON, so a killed run continues with ``resume=True`` where it stopped. Their
``state.json`` records a hash of every tensor and of itself (checked on resume).

A loss, gradient or trained value that becomes NaN or infinite stops training with a
``TrainingError`` before anything is written, so the last checkpoint on disk is the last good one.

Data-parallel: started by ``torchrun`` or ``accelerate launch`` inside
``alphatune.distributed.data_parallel()`` (``alphatune tune`` does this), the same call trains with
``DistributedDataParallel``. ``batch_size`` stays the global micro-batch: each process takes every
``world_size``-th example of it and scales its loss so that the all-reduced gradient is the one a
single process computes for the whole micro-batch. The same settings therefore give the same α on
1 or N processes (to float rounding). Only rank 0 writes checkpoints and shows progress.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from alphatune.config import AlphaTuningConfig, TrainConfig
from alphatune.data import IGNORE_INDEX, Example, collate, encode_example
from alphatune.distributed import DataParallel, current
from alphatune.errors import AlphaTuneError, CheckpointError, ConfigError, TrainingError
from alphatune.files import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_STATE,
    CHECKPOINT_TENSORS,
    INTEGRITY,
    existing_directory,
    nonfinite,
    read_json,
    read_safetensors,
    replace_directory,
    seal,
    verify_document,
    verify_tensors,
)
from alphatune.layers import SCALE_NAMES
from alphatune.models import model_device
from alphatune.tuning import trainable_state

logger = logging.getLogger(__name__)

CHECKPOINT_RECORD = (INTEGRITY,)  # where state.json keeps its hashes (see alphatune.files.seal)


@dataclass
class TrainResult:
    """Losses along the way (per optimizer step) and where training ended."""

    steps: int
    train_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


def causal_lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of next-token prediction over labelled positions.

    logits ``(B, T, V)``, labels ``(B, T)`` with ``IGNORE_INDEX`` on prompt and padding.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(
        shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing
    )


# AdamW's first step moves a value by up to lr / (1 - beta1) = 10 lr, a float32 number: past this
# the step cannot even be computed (torch raises an overflow error deep in the optimizer).
_MAX_LEARNING_RATE = torch.finfo(torch.float32).max * (1 - 0.9)


def _param_groups(
    model: nn.Module, config: TrainConfig, tuning: AlphaTuningConfig
) -> list[dict[str, Any]]:
    scales, others = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (scales if name.rsplit(".", 1)[-1] in SCALE_NAMES else others).append(p)
    if not scales and not others:
        raise ConfigError("nothing to train: call prepare_for_alphatuning(model) first")
    lr = config.learning_rate * tuning.alpha_lr_scale
    if not max(lr, config.learning_rate) < _MAX_LEARNING_RATE:
        raise ConfigError(
            f"learning_rate {config.learning_rate:g} (x alpha_lr_scale {tuning.alpha_lr_scale:g} "
            f"= {lr:g} for the scales) is too large to step float32 values; useful rates are "
            "far below 1"
        )
    groups = [{"params": scales, "lr": lr}]
    if others:
        groups.append({"params": others, "lr": config.learning_rate})
    return groups


def _linear_schedule(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (n, seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _batches_for_step(step: int, n_examples: int, config: TrainConfig) -> list[list[int]]:
    """Example indices of the micro-batches of optimizer step ``step`` (deterministic, resumable)."""
    per_step = config.batch_size * config.grad_accum
    start = step * per_step
    indices = []
    for position in range(start, start + per_step):
        epoch, offset = divmod(position, n_examples)
        indices.append(_epoch_order(n_examples, config.seed, epoch)[offset])
    return [indices[i : i + config.batch_size] for i in range(0, per_step, config.batch_size)]


def total_steps(n_examples: int, config: TrainConfig) -> int:
    """Optimizer steps of a run: ``max_steps`` when set (it overrides epochs), else the epochs'."""
    if config.max_steps:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum
    return max(1, math.ceil(config.epochs * n_examples / per_step))


def evaluate_loss(
    model: nn.Module,
    encoded: Sequence[dict[str, list[int]]],
    pad_id: int,
    batch_size: int = 8,
    parallel: DataParallel | None = None,
) -> float:
    """Mean target-token cross-entropy (no label smoothing) over encoded examples.

    With ``parallel`` enabled each process scores its share and the sums are combined, so every
    process returns the same mean.
    """
    parallel = parallel or DataParallel()
    encoded = parallel.shard(list(encoded))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = _to(collate(encoded[start : start + batch_size], pad_id), device)
            logits = _forward(model, batch)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(causal_lm_loss(logits, batch["labels"])) * n
            count += n
    model.train(was_training)
    if parallel.enabled:
        total, count = parallel.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / max(count, 1)


def _target_count(item: dict[str, list[int]]) -> int:
    """Positions of an encoded example that ``causal_lm_loss`` scores (labels after the shift)."""
    return sum(label != IGNORE_INDEX for label in item["labels"][1:])


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _forward(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits


def _save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    result: TrainResult,
    fingerprint: str,
    config: TrainConfig,
) -> None:
    trainable = trainable_state(model)
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in trainable.items()}
    index = {id(p): n for n, p in trainable.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{index[id(p)]}/{key}"] = value.detach().cpu().contiguous()
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "fingerprint": fingerprint,
        "train_config": config.to_dict(),
        "train_losses": result.train_losses,
        "eval_losses": result.eval_losses,
    }
    document = seal(state, CHECKPOINT_RECORD, tensors=tensors)

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / CHECKPOINT_TENSORS)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(document))

    replace_directory(directory, write)


# Settings that decide the data order and the schedule: a resumed run must keep them.
_RESUME_KEYS = (
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "seed",
    "max_length",
    "learning_rate",
    "warmup_ratio",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, its hash and the fields resuming reads checked."""
    path = directory / CHECKPOINT_STATE
    state = read_json(path)
    verify_document(path, state, CHECKPOINT_RECORD)
    step, losses, evals = state.get("step"), state.get("train_losses"), state.get("eval_losses")
    problems = []
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        problems.append(f"'step' is {step!r}, expected a non-negative integer")
    if not isinstance(losses, list) or not all(_is_number(x) for x in losses):
        problems.append("'train_losses' is not a list of numbers")
    if not isinstance(evals, list) or not all(
        isinstance(e, list) and len(e) == 2 and all(_is_number(x) for x in e) for e in evals
    ):
        problems.append("'eval_losses' is not a list of [step, loss] pairs")
    if not isinstance(state.get("train_config", {}), dict):
        problems.append("'train_config' is not an object")
    if problems:
        raise CheckpointError(
            f"{path}: {'; '.join(problems)}; the checkpoint is corrupted, start a new run "
            "(or remove --resume)"
        )
    return state


def _load_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    config: TrainConfig,
) -> dict[str, Any]:
    state = _read_state(directory)
    tensors = read_safetensors(directory / CHECKPOINT_TENSORS)
    verify_tensors(directory / CHECKPOINT_TENSORS, tensors, state.get(INTEGRITY))
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(
            f"{directory / CHECKPOINT_TENSORS}: {', '.join(bad[:3])} hold NaN or infinity; this "
            "checkpoint cannot be resumed, start a new run (a lower learning rate?)"
        )
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{directory}: checkpoint belongs to base {state.get('fingerprint')}, this base is "
            f"{fingerprint}; resume with the same base or start a new output directory"
        )
    saved = state.get("train_config", {})
    changed = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(config, k)]
    if changed:
        values = ", ".join(f"{k}: {saved[k]!r} -> {getattr(config, k)!r}" for k in changed)
        raise CheckpointError(
            f"{directory}: cannot resume with different settings ({values}); use the original "
            "settings or start a new output directory"
        )
    params = trainable_state(model)
    unknown = sorted({k.split("/")[1] for k in tensors if k.startswith("param/")} - set(params))
    if unknown:
        raise CheckpointError(
            f"{directory}: checkpoint trains {unknown[:3]}, which this run does not (different "
            "tuning config?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            key = f"param/{name}"
            if key not in tensors:
                raise CheckpointError(
                    f"{directory}: checkpoint lacks {name!r} (different tuning config?)"
                )
            if tensors[key].shape != p.shape:
                raise CheckpointError(
                    f"{directory}: checkpoint holds {name!r} of shape {tuple(tensors[key].shape)}, "
                    f"the model's is {tuple(p.shape)} (another base or tuning config?)"
                )
            p.copy_(tensors[key])
    for name, p in params.items():
        prefix = f"optim/{name}/"
        slots = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if slots:
            # Moment estimates live beside their parameter; Adam keeps its step count on the CPU.
            optimizer.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in slots.items()}
    return state


def train(
    model: nn.Module,
    tokenizer: Any,
    train_examples: Sequence[Example],
    config: TrainConfig,
    tuning: AlphaTuningConfig | None = None,
    *,
    eval_examples: Sequence[Example] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    fingerprint: str = "",
) -> TrainResult:
    """α-tune ``model`` (already prepared with ``prepare_for_alphatuning``) on prompt/target pairs.

    Args:
        train_examples: prompt/target pairs; loss is taken on target tokens only.
        config: optimisation settings (see ``TrainConfig``).
        eval_examples: scored every ``config.eval_every`` steps and at the end.
        output_dir: where checkpoints go (``<output_dir>/checkpoint``) every
            ``config.checkpoint_every`` steps; ``None`` disables checkpoints.
        resume: continue from the checkpoint in ``output_dir``.
        fingerprint: base fingerprint recorded in checkpoints, checked on resume.
    """
    if not train_examples:
        raise ConfigError("no training examples")
    tuning = tuning or AlphaTuningConfig()
    parallel = current()
    if config.batch_size < parallel.world_size:
        raise ConfigError(
            f"batch_size {config.batch_size} is smaller than the {parallel.world_size} training "
            "processes: each process takes a share of every micro-batch; raise batch_size to at "
            f"least {parallel.world_size} (lower grad_accum to keep the examples per step)"
        )
    if parallel.device.type == "cuda" and model_device(model) != parallel.device:
        raise ConfigError(
            f"this process trains on {parallel.device} but the model is on "
            f"{model_device(model)}; call model.to(parallel.device) first"
        )
    progress = progress and parallel.is_main
    torch.manual_seed(config.seed)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise ConfigError(
            "the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token"
        )
    encoded = [encode_example(tokenizer, ex, config.max_length) for ex in train_examples]
    targets = [_target_count(item) for item in encoded]
    eval_encoded = [encode_example(tokenizer, ex, config.max_length) for ex in eval_examples or []]
    steps = total_steps(len(encoded), config)
    warmup = int(config.warmup_ratio * steps)
    optimizer = torch.optim.AdamW(
        _param_groups(model, config, tuning), weight_decay=config.weight_decay
    )
    optimizer.zero_grad(set_to_none=True)  # gradients left by earlier work must not join step 1
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    schedule = _linear_schedule(steps, warmup)
    result = TrainResult(steps=steps)
    checkpoint = Path(output_dir) / CHECKPOINT_DIR if output_dir is not None else None
    start_step = 0
    # Every process reads the checkpoint (a shared file system when they run on several
    # machines); a process that fails here makes all of them stop, not wait for it.
    failure: AlphaTuneError | None = None
    try:
        if parallel.enabled:
            _check_same_base(parallel, fingerprint)
        if resume:
            state = _resume(checkpoint, output_dir, model, optimizer, fingerprint, config, steps)
            start_step = state["step"]
            result.train_losses = list(state["train_losses"])
            result.eval_losses = [tuple(e) for e in state["eval_losses"]]  # type: ignore[misc]
            result.resumed_from = start_step
            logger.info("resumed from step %d", start_step)
    except AlphaTuneError as err:
        failure = err
    parallel.raise_together(failure)

    trainable_named = trainable_state(model)
    trainable = list(trainable_named.values())
    last_saved = start_step if resume else None

    def diverged(step: int, what: str) -> TrainingError:
        kept = (
            f"the checkpoint of step {last_saved} in {checkpoint} is kept"
            if last_saved is not None
            else "no checkpoint was written"
        )
        return TrainingError(
            f"training stopped at step {step + 1}: {what}. Nothing was saved after that: {kept}. "
            f"Train again with a lower learning rate (now {config.learning_rate:g}"
            f"{f', scales x{tuning.alpha_lr_scale:g}' if tuning.alpha_lr_scale != 1 else ''}) "
            "or more warm-up"
        )

    # The paper's recipe trains without dropout: eval mode switches it off in any architecture.
    model.train(config.dropout)
    device = model_device(model)
    # DDP (several processes) all-reduces the gradients of what trains: the scales only.
    network = parallel.wrap(model)
    began = time.perf_counter()
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("α-tuning"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("train", total=steps, completed=start_step, loss="-")
        for step in range(start_step, steps):
            step_loss = 0.0
            micro_batches = _batches_for_step(step, len(encoded), config)
            for position, indices in enumerate(micro_batches):
                last = position == len(micro_batches) - 1
                # DDP all-reduces once per optimizer step, in the last micro-batch's backward.
                sync = (
                    contextlib.nullcontext() if last or not parallel.enabled else network.no_sync()
                )
                with sync:
                    loss = _micro_batch_loss(
                        network, encoded, targets, indices, parallel, pad_id, device, config
                    )
                    (loss / len(micro_batches)).backward()
                step_loss += loss.item() / len(micro_batches)
            if parallel.enabled:
                step_loss = float(parallel.sum(torch.tensor(step_loss, dtype=torch.float64)))
                step_loss /= parallel.world_size
            if not math.isfinite(step_loss):
                raise diverged(step, f"the loss is {step_loss}")
            # What clip_grad_norm_ does, in its two halves, so the norm can be checked between.
            norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            if not bool(torch.isfinite(norm)):
                raise diverged(step, f"the gradient norm is {float(norm)}")
            if config.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(trainable, config.max_grad_norm, norm)
            # The schedule is a pure function of the step, so a resumed run needs no saved state.
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * schedule(step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bad = nonfinite(trainable_named)
            if bad:
                raise diverged(step, f"the update made {', '.join(bad[:3])} NaN or infinite")
            result.train_losses.append(step_loss)
            bar.update(task, advance=1, loss=f"{step_loss:.3f}")
            done = step + 1
            if (
                eval_encoded
                and config.eval_every
                and done % config.eval_every == 0
                and done < steps
            ):
                loss = evaluate_loss(model, eval_encoded, pad_id, parallel=parallel)
                result.eval_losses.append((done, loss))
                model.train(config.dropout)
            if (
                checkpoint is not None
                and config.checkpoint_every
                and done % config.checkpoint_every == 0
            ):
                if parallel.is_main:
                    _save_checkpoint(
                        checkpoint, model, optimizer, done, result, fingerprint, config
                    )
                last_saved = done
    if eval_encoded:
        loss = evaluate_loss(model, eval_encoded, pad_id, parallel=parallel)
        result.eval_losses.append((steps, loss))
    model.eval()
    result.seconds = time.perf_counter() - began
    if checkpoint is not None and parallel.is_main:
        _save_checkpoint(checkpoint, model, optimizer, steps, result, fingerprint, config)
    return result


def _micro_batch_loss(
    network: nn.Module,
    encoded: Sequence[dict[str, list[int]]],
    targets: Sequence[int],
    indices: list[int],
    parallel: DataParallel,
    pad_id: int,
    device: torch.device,
    config: TrainConfig,
) -> Tensor:
    """This process's part of the loss of the micro-batch ``indices``.

    One process: the mean over the micro-batch's target tokens. Several: the mean over this
    process's share times ``share tokens / micro-batch tokens * world_size``, so that DDP's
    average of the gradients is the gradient of the whole micro-batch's mean.
    """
    share = parallel.shard(indices)
    total, mine = sum(targets[i] for i in indices), sum(targets[i] for i in share)
    batch = _to(collate([encoded[i] for i in share], pad_id), device)
    logits = _forward(network, batch)
    if total and not mine:
        return logits.float().sum() * 0.0  # no target here; still joins DDP's all-reduce
    loss = causal_lm_loss(logits, batch["labels"], config.label_smoothing)
    factor = mine * parallel.world_size / total if total else 1.0
    return loss if factor == 1.0 else loss * factor


def _resume(
    checkpoint: Path | None,
    output_dir: str | os.PathLike[str] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: str,
    config: TrainConfig,
    steps: int,
) -> dict[str, Any]:
    """Load the checkpoint in ``output_dir`` into ``model`` and ``optimizer``; its state."""
    found = existing_directory(checkpoint) if checkpoint is not None else None
    if found is None or not (found / CHECKPOINT_STATE).exists():
        raise CheckpointError(
            f"nothing to resume: no checkpoint in {output_dir}; run without --resume"
        )
    state = _load_checkpoint(found, model, optimizer, fingerprint, config)
    if state["step"] > steps:
        raise CheckpointError(
            f"{found}: the checkpoint is at step {state['step']}, past this run's {steps} steps "
            "(different training data?); resume with the same data or start a new run"
        )
    return state


def _check_same_base(parallel: DataParallel, fingerprint: str) -> None:
    """Refuse processes that loaded different bases (their codes are never compared or sent)."""
    prints = parallel.gather(fingerprint)
    if len(set(prints)) > 1:
        listed = ", ".join(
            f"process {rank}: {value or '(none given)'}" for rank, value in enumerate(prints)
        )
        raise ConfigError(
            f"the training processes hold different bases ({listed}); every process must load "
            "the same base (pass the same --base to all of them, on a shared file system)"
        )
