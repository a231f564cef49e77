"""Running one spec: prepare the method, train with the shared loop, score, write the result file.

``run`` is idempotent: a spec whose result file exists is not run again, and a killed run resumes
from its last training checkpoint (every 50 steps; full fine-tuning, whose checkpoint would be the
whole model and its optimizer state, restarts instead) and from the answers it had decoded
(``predict``: saved every ``PREDICTION_CHUNK`` prompts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from alphatune.config import TrainConfig
from alphatune.errors import ConfigError
from alphatune.evaluate import generate
from alphatune.evaluate.generation import generation_order
from alphatune.experiments.methods import (
    HANDOFF,
    Prepared,
    family_of,
    get_method,
    parent_spec,
    parent_work,
)
from alphatune.experiments.spec import (
    RESULT_FORMAT,
    RunSpec,
    environment,
    read_result,
    result_path,
    work_path,
    write_json,
)
from alphatune.experiments.tasks import SST2_LABELS, classify, get_task
from alphatune.files import tensor_digest
from alphatune.models import load_model
from alphatune.train import CHECKPOINT_DIR, train

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY = 50
LOCK = ".lock"
GENERATION_BATCH = 16
# Prompts decoded between saves of the answers so far (a whole number of batches).
PREDICTION_CHUNK = 8 * GENERATION_BATCH


@functools.lru_cache(maxsize=4)
def fp32_bytes(model_name: str) -> int:
    """Bytes of the unquantized model in fp32 (tied tensors once): the compression reference."""
    model = load_model(model_name)
    return 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def train_config(spec: RunSpec) -> TrainConfig:
    """The shared recipe (AdamW, linear decay with warm-up, label smoothing 0.1) at the budget."""
    return TrainConfig(
        learning_rate=spec.learning_rate,
        batch_size=spec.budget.batch_size,
        max_steps=spec.budget.steps,
        max_length=spec.budget.max_length,
        seed=spec.seed,
        checkpoint_every=CHECKPOINT_EVERY,
    )


def _train(spec: RunSpec, prepared: Prepared, work: Path, progress: bool) -> dict[str, Any]:
    task = get_task(spec.task)
    # A full fine-tuning checkpoint is the whole model plus Adam's two moments: restart instead.
    output = None if spec.method == "full-ft" else work
    resume = output is not None and (output / CHECKPOINT_DIR / "state.json").exists()
    result = train(
        prepared.model,
        prepared.tokenizer,
        task.train_examples(),
        train_config(spec),
        output_dir=output,
        resume=resume,
        progress=progress,
    )
    losses = result.train_losses
    tail = losses[-20:]
    return {
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        # == steps: the training was done by the dev run of the same rate and seed (its time
        # is in that run's file).
        "resumed_from": result.resumed_from,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail) if tail else None,
        "losses_every_10": losses[::10],
    }


def predict(
    spec: RunSpec,
    prepared: Prepared,
    prompts: list[str],
    progress: bool,
    saved: Path | None = None,
) -> list[str]:
    """The method's answers: generated text, or the chosen label for a classification task.

    ``saved``: a file that keeps the answers so far, written after each chunk of
    ``PREDICTION_CHUNK`` prompts. A test set's decoding can take longer than the machine stays
    up; a killed run then decodes only the chunks it had not finished. The chunks follow
    ``generate``'s own order, each a whole number of its batches, so the answers are those of
    one call over all prompts. The file is only used again by a model and prompts of the same
    hash (a full fine-tuning restarts its training, which may not give the same weights).
    """
    if not get_task(spec.task).generates:
        return classify(prepared.model, prepared.tokenizer, prompts, SST2_LABELS)
    if saved is None:
        return _generate(spec, prepared, prompts, progress)
    identity = {"model": _model_digest(prepared.model), "prompts": _text_digest(prompts)}
    answers = _saved_answers(saved, identity)
    if answers:  # their time is in an earlier process's: the result's eval seconds omit it
        prepared.notes["answers_decoded_before"] = len(answers)
    order = generation_order(prepared.tokenizer, prompts)
    for start in range(0, len(order), PREDICTION_CHUNK):
        chunk = order[start : start + PREDICTION_CHUNK]
        if all(i in answers for i in chunk):
            continue
        texts = _generate(spec, prepared, [prompts[i] for i in chunk], progress)
        answers.update(zip(chunk, texts, strict=True))
        write_json(saved, {**identity, "answers": {str(i): a for i, a in answers.items()}})
    return [answers[i] for i in range(len(prompts))]


def _saved_answers(saved: Path, identity: dict[str, str]) -> dict[int, str]:
    """The answers in ``saved`` if it was written for ``identity``, else none."""
    try:
        document = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if {key: document.get(key) for key in identity} != identity:
        logger.info("%s: answers of another model or prompts; decoding again", saved)
        return {}
    answers = {int(i): a for i, a in document.get("answers", {}).items()}
    logger.info("%s: %d answers decoded before; resuming", saved, len(answers))
    return answers


def _model_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}={tensor_digest(tensor)};".encode())
    return digest.hexdigest()


def _text_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def _generate(spec: RunSpec, prepared: Prepared, prompts: list[str], progress: bool) -> list[str]:
    return generate(
        prepared.model,
        prepared.tokenizer,
        prompts,
        max_new_tokens=spec.budget.max_new_tokens,
        num_beams=spec.budget.num_beams,
        batch_size=GENERATION_BATCH,
        progress=progress,
        # One generation path for every method: the decode engine serves only BCQ Llama models,
        # so the baselines (fp, peft-wrapped) would otherwise decode through another path.
        engine=False,
    )


def run(
    spec: RunSpec,
    results_dir: Path,
    work_dir: Path,
    *,
    progress: bool = False,
    handoff: bool = True,
) -> dict[str, Any]:
    """Run ``spec`` (or read its result if it ran already) and return the result.

    Args:
        results_dir: where result files go (``<results_dir>/<task>/<run id>.json``).
        work_dir: checkpoints and the weights later runs reuse.
        handoff: save what runs derived from this one need (fine-tuned weights for PTQ).
    """
    path = result_path(results_dir, spec)
    if path.exists():
        return read_result(path, spec.task)
    task, method = get_task(spec.task), get_method(spec.method)
    task.check_split(spec.split)  # a split the task lacks fails now, not after training
    work = work_path(work_dir, spec)
    work.mkdir(parents=True, exist_ok=True)
    with run_lock(work):
        return _run(spec, task, method, path, work, progress, handoff)


def running(work: Path) -> bool:
    """Whether a live process holds the run's lock (another grid is running it)."""
    try:
        pid = int((work / LOCK).read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


@contextmanager
def run_lock(work: Path) -> Iterator[None]:
    """Hold ``work/.lock`` (our pid) for the run; a lock of a dead process is taken over."""
    if running(work):
        raise ConfigError(f"{work} is being run by another process; let it finish")
    (work / LOCK).write_text(str(os.getpid()))
    try:
        yield
    finally:
        (work / LOCK).unlink(missing_ok=True)


def _run(
    spec: RunSpec,
    task: Any,
    method: Any,
    path: Path,
    work: Path,
    progress: bool,
    handoff: bool,
) -> dict[str, Any]:
    # Before the clock starts: a retrained parent's time is in its own note, not in "prepare".
    retrained = _retrain_parent(spec, path, work, progress) if method.parent else None
    began = time.perf_counter()
    torch.manual_seed(spec.seed)
    prepared = method.prepare(spec, work)
    if retrained is not None:
        prepared.notes["parent_weights"] = retrained
    trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    prepare_seconds = time.perf_counter() - began
    training = _train(spec, prepared, work, progress) if method.trains else None

    scored = time.perf_counter()
    eval_set = task.eval_set(spec.split, spec.budget.eval_limit)
    saved = work / f"answers-{spec.split}.json"  # dev and test runs of a rate share ``work``
    prompts = [item.prompt for item in eval_set.items]
    predictions = predict(spec, prepared, prompts, progress, saved)
    scores = task.score(predictions, eval_set)
    eval_seconds = time.perf_counter() - scored
    if handoff and spec.split == "test" and prepared.handoff is not None:
        _hand_off(prepared, work)  # only test runs have runs derived from them

    reference = fp32_bytes(spec.model)
    result = {
        "format": RESULT_FORMAT,
        "spec": spec.to_dict(),
        "variant": spec.variant,
        "family": family_of(spec.method, spec.options),
        "environment": environment(),
        "trainable_parameters": trainable,
        "stored_bytes": prepared.stored_bytes,
        "adapter_bytes": prepared.adapter_bytes,
        "bits_per_weight": prepared.bits_per_weight,
        "compression_vs_fp32": round(reference / prepared.stored_bytes, 3),
        "notes": prepared.notes,
        "training": training,
        "scores": scores,
        "seconds": {
            "prepare": round(prepare_seconds, 1),
            "eval": round(eval_seconds, 1),
            "total": round(time.perf_counter() - began, 1),
        },
        "predictions": predictions,
    }
    write_json(path, result)
    saved.unlink(missing_ok=True)  # the answers are in the result now
    return result


def _hand_off(prepared: Prepared, work: Path) -> None:
    """Save what derived runs need as ``work/model``, whole or not at all.

    Written into a staging folder, then renamed: a run killed while saving leaves no ``model``
    folder that looks complete (its ``config.json`` is written before the weights).
    """
    assert prepared.handoff is not None, "this method saves no weights for derived runs"
    staging = work / "handoff.partial"
    shutil.rmtree(staging, ignore_errors=True)
    prepared.handoff(staging)
    shutil.rmtree(work / HANDOFF, ignore_errors=True)
    os.replace(staging / HANDOFF, work / HANDOFF)
    shutil.rmtree(staging)


def _retrain_parent(spec: RunSpec, path: Path, work: Path, progress: bool) -> dict[str, Any] | None:
    """Train ``spec``'s parent run again where its result exists but its weights are not here.

    Derived runs (LoRA → PTQ, FT → PTQ) quantize weights their parent saved in the work folder,
    which stays on the machine that ran the parent; the grid moves between machines. The parent
    is trained again with its own spec and seed (only the training: its scores are in its
    result file), and the derived result notes that, with both final losses to compare.
    Without the parent's result nothing is trained, and ``prepare`` says which run is missing.
    """
    parent, source = parent_spec(spec), parent_work(spec, work)
    parent_result = result_path(path.parent.parent, parent)
    if (source / HANDOFF).exists() or not parent_result.exists():
        return None
    source.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with run_lock(source):
        if (source / HANDOFF).exists():  # another derived run of this parent made them meanwhile
            return None
        logger.warning(
            "%s: the weights of %s are not on this machine; training it again",
            spec.run_id,
            parent.run_id,
        )
        torch.manual_seed(parent.seed)
        prepared = get_method(parent.method).prepare(parent, source)
        training = _train(parent, prepared, source, progress)
        _hand_off(prepared, source)
    recorded = read_result(parent_result, parent.task).get("training") or {}
    return {
        "retrained": True,
        # A LoRA parent's checkpoint may be here (its dev run shares the training): then it
        # resumes at its last step and only the merge is redone (resumed_from == steps).
        "steps": training["steps"],
        "resumed_from": training["resumed_from"],
        "seconds": round(time.perf_counter() - began, 1),
        "final_loss": training["final_loss"],
        "final_loss_in_parent_result": recorded.get("final_loss"),
        "environment": environment(),
    }


def rescore(path: Path) -> dict[str, Any]:
    """Recompute a result's scores from its saved predictions (after a metric changed)."""
    result = read_result(path)
    spec = RunSpec.from_dict(result["spec"])
    task = get_task(spec.task)
    eval_set = task.eval_set(spec.split, spec.budget.eval_limit)
    if len(eval_set.items) != len(result["predictions"]):
        raise ValueError(
            f"{path}: {len(result['predictions'])} predictions but the evaluation set has "
            f"{len(eval_set.items)} items; rerun it"
        )
    result["scores"] = task.score(result["predictions"], eval_set)
    # The run's own environment stays; this says which code computed the scores now in it.
    scored_by = environment()
    result["rescored"] = {"commit": scored_by["commit"], "date": scored_by["date"]}
    write_json(path, result)
    return result
