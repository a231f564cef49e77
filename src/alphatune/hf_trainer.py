"""α-tuning with transformers' ``Trainer`` (and TRL's ``SFTTrainer``): adapters at its checkpoints.

A model prepared with ``prepare_for_alphatuning`` trains under ``Trainer`` unchanged: only the
scales require grad, so Trainer's optimizer holds only them, and the binary codes are buffers it
never touches. Trainer's checkpoints save the whole packed base (``save_pretrained``, through the
quantizer in ``alphatune.hf``) and resume exactly. What Trainer cannot write is an alphatune
adapter, the few hundred kilobytes a task needs; ``AdapterCallback`` adds one to every checkpoint
and one at the end. Data-parallel Trainer runs (``torchrun``, ``accelerate launch``) write it from
the main process only.

What this module owns: the callback and where it puts adapters. ``alphatune tune`` does not use
it: the command runs ``alphatune.train`` (why: docs/training.md).

Example::

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from alphatune import AdapterCallback, AlphaTuningConfig, prepare_for_alphatuning
    from alphatune.data import encode_example

    tuning = AlphaTuningConfig()
    prepare_for_alphatuning(model, tuning)
    data = [encode_example(tokenizer, example, 128) for example in examples]
    trainer = Trainer(
        model=model,
        args=TrainingArguments("run", learning_rate=2e-3, weight_decay=0.01, max_steps=100),
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[AdapterCallback(tuning)],
    )
    trainer.train()  # run/checkpoint-*/adapter, and run/adapter at the end
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alphatune.adapters import save_adapter
from alphatune.config import AlphaTuningConfig
from alphatune.files import ADAPTER_MARKERS, ADAPTER_SUBDIR, check_output_dir

logger = logging.getLogger(__name__)

# Training arguments an adapter records (the rest of TrainingArguments is about logging and I/O).
RECORDED_ARGUMENTS = (
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "label_smoothing_factor",
    "max_grad_norm",
    "seed",
    "world_size",
)


class AdapterCallback(TrainerCallback):
    """Write an alphatune adapter (the trained scales only) at each checkpoint and at the end.

    Adapters go to ``<output_dir>/checkpoint-<step>/adapter`` beside Trainer's own files, and to
    ``adapter_dir`` (default ``<output_dir>/adapter``) when training ends. Each records the base
    fingerprint, the tuning config, the training arguments, the step and the last logged loss,
    and loads with ``alphatune.load_adapter``.

    Args:
        tuning: the config the model was prepared with (recorded in the adapter).
        adapter_dir: where the final adapter goes.
        metadata: more JSON data to record (a task name, a data file).
        overwrite: replace an existing final adapter; without it, an existing one stops
            training before the first step, not after the last.
    """

    def __init__(
        self,
        tuning: AlphaTuningConfig | None = None,
        *,
        adapter_dir: str | os.PathLike[str] | None = None,
        metadata: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.tuning = tuning or AlphaTuningConfig()
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite

    def final_dir(self, args: TrainingArguments) -> Path:
        """Where the adapter of the finished run goes."""
        return self.adapter_dir or Path(args.output_dir) / ADAPTER_SUBDIR

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            check_output_dir(self.final_dir(args), ADAPTER_MARKERS, self.overwrite)
        if self.tuning.alpha_lr_scale != 1:
            logger.warning(
                "alpha_lr_scale=%g is applied by alphatune.train only; Trainer gives every "
                "trained tensor its learning_rate (scale learning_rate instead)",
                self.tuning.alpha_lr_scale,
            )

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or model is None:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not checkpoint.is_dir():
            logger.warning("no checkpoint folder %s; its adapter is not written", checkpoint)
            return
        self._save(model, checkpoint / ADAPTER_SUBDIR, args, state, overwrite=True)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and model is not None:
            self._save(model, self.final_dir(args), args, state, overwrite=self.overwrite)

    def _save(
        self,
        model: nn.Module,
        directory: Path,
        args: TrainingArguments,
        state: TrainerState,
        overwrite: bool,
    ) -> None:
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        metadata = {
            **self.metadata,
            "trainer": {
                name: _json_value(getattr(args, name, None)) for name in RECORDED_ARGUMENTS
            },
            "steps": state.global_step,
            "train_loss": losses[-1] if losses else None,
        }
        save_adapter(model, directory, self.tuning, metadata=metadata, overwrite=overwrite)
        logger.info("adapter of step %d saved to %s", state.global_step, directory)


def _json_value(value: Any) -> Any:
    """A training argument as JSON data (enums by their value)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)
