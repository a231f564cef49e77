"""α-tuning under transformers' Trainer and TRL's SFTTrainer: only α changes, the loss falls, the
adapters written at checkpoints and at the end load with ``load_adapter``, Trainer resumes exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from alphatune import (
    AdapterCallback,
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    load_adapter,
    prepare_for_alphatuning,
    quantize_,
    read_adapter,
)
from alphatune.data import Example, encode_example
from alphatune.files import ADAPTER_SUBDIR

NAMES = ["Aromi", "Blue Spice", "Cotto", "Zizzi", "The Mill", "Wildwood"]
EXAMPLES = [Example(prompt=f"Table: name[{n}]\nText:", target=f" {n} is a pub.") for n in NAMES]
STEPS, SAVE_EVERY = 10, 5


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    """Trainer runs here with torch's thread count set once for the module."""


def quantized(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    quantize_(model, BCQConfig(bits=3, group_size=32, method="offset"))
    return model


def tunable(tokenizer, tuning=None):
    model = quantized(tokenizer)
    prepare_for_alphatuning(model, tuning or AlphaTuningConfig())
    return model


SETTINGS = {
    "per_device_train_batch_size": 3,
    "max_steps": STEPS,
    "learning_rate": 2e-2,
    "weight_decay": 0.01,
    "save_steps": SAVE_EVERY,
    "logging_steps": 1,
    "report_to": [],
    "use_cpu": True,
    "disable_tqdm": True,
    "seed": 0,
}


def arguments(output: Path, **overrides) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output), **(SETTINGS | overrides))


def trainer_for(model, tokenizer, output: Path, callbacks=(), **overrides) -> Trainer:
    return Trainer(
        model=model,
        args=arguments(output, **overrides),
        train_dataset=[encode_example(tokenizer, example, 64) for example in EXAMPLES],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=list(callbacks),
    )


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([encode_example(tokenizer, EXAMPLES[0], 64)["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_only_alpha_changed(before, after):
    for name, value in after.items():
        if name.endswith(".alpha1"):
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"{name} changed"


def assert_loss_falls(losses):
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    output = tmp_path_factory.mktemp("trainer")
    model = tunable(tokenizer)
    before = state(model)
    callback = AdapterCallback(AlphaTuningConfig(), metadata={"task": "pubs"})
    trainer = trainer_for(model, tokenizer, output, callbacks=[callback])
    trainer.train()
    return model, before, trainer, output


def test_trainer_trains_only_alpha_and_the_loss_falls(trained):
    model, before, trainer, _ = trained
    assert_only_alpha_changed(before, state(model))
    assert_loss_falls(logged_losses(trainer))


def test_the_adapters_load_and_reproduce_the_model(trained, tokenizer):
    model, _, trainer, output = trained
    final = output / ADAPTER_SUBDIR
    base = quantized(tokenizer)
    config = load_adapter(base, final)
    torch.testing.assert_close(logits(base, tokenizer), logits(model, tokenizer), rtol=0, atol=0)
    metadata = config["metadata"]
    assert metadata["task"] == "pubs" and metadata["steps"] == STEPS
    assert metadata["trainer"]["learning_rate"] == 2e-2
    assert metadata["train_loss"] == logged_losses(trainer)[-1]
    # The checkpoint's adapter holds the scales of its step: other values, same base.
    _, halfway = read_adapter(base, output / f"checkpoint-{SAVE_EVERY}" / ADAPTER_SUBDIR)
    _, last = read_adapter(base, final)
    assert set(halfway) == set(last)
    assert not any(torch.equal(halfway[name], last[name]) for name in last)


def test_trainer_resumes_a_checkpoint_exactly(trained, tokenizer, tmp_path):
    model, _, _, output = trained
    resumed = tunable(tokenizer)
    trainer = trainer_for(resumed, tokenizer, tmp_path)
    trainer.train(resume_from_checkpoint=str(output / f"checkpoint-{SAVE_EVERY}"))
    expected = state(model)
    for name, value in state(resumed).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_an_existing_adapter_stops_training_before_the_first_step(tokenizer, tmp_path):
    kept = tmp_path / ADAPTER_SUBDIR
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    model = tunable(tokenizer)
    before = state(model)
    trainer = trainer_for(model, tokenizer, tmp_path, callbacks=[AdapterCallback()])
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        trainer.train()
    assert (kept / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob("checkpoint-*"))
    for name, value in state(model).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("head", ["keep", "default"])
def test_sft_trainer_trains_only_alpha(tokenizer, tmp_path, head):
    trl = pytest.importorskip("trl", reason="TRL is optional: pip install 'alphatune[trl]'")
    from datasets import Dataset

    config = BCQConfig(bits=3, group_size=32, method="offset")
    if head == "keep":
        config = dataclasses.replace(config, lm_head="keep")
    model = make_tiny_llama(len(tokenizer))
    quantize_(model, config)
    if not isinstance(getattr(model.get_output_embeddings(), "weight", None), torch.Tensor):
        pytest.skip(
            f"TRL's fused LM head reads lm_head.weight; {type(model.get_output_embeddings()).__name__}"
            " has none (docs/training.md)"
        )
    prepare_for_alphatuning(model)
    before = state(model)
    data = Dataset.from_list([{"prompt": e.prompt, "completion": e.target} for e in EXAMPLES])
    arguments = trl.SFTConfig(
        output_dir=str(tmp_path), **(SETTINGS | {"save_strategy": "no"}), max_length=64
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=arguments,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[AdapterCallback()],
    )
    trainer.train()  # TRL's default: bf16 autocast (forward) over the fp32 scales
    assert_only_alpha_changed(before, state(model))
    assert_loss_falls(logged_losses(trainer))
    # Accelerate leaves the autocast wrapper on model.forward; compare with the fp32 forward.
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    base = make_tiny_llama(len(tokenizer))
    quantize_(base, config)
    load_adapter(base, tmp_path / ADAPTER_SUBDIR)
    torch.testing.assert_close(logits(base, tokenizer), logits(model, tokenizer), rtol=0, atol=0)
