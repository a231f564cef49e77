"""The α-tuning loop: the loss falls, checkpoints resume exactly, bad settings fail clearly."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import make_tiny_llama

from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    ConfigError,
    TrainConfig,
    prepare_for_alphatuning,
    quantize_,
)
from alphatune.data import Example
from alphatune.train import causal_lm_loss, train


@pytest.fixture(scope="module")
def examples():
    # A small, learnable mapping in the E2E shape: prompt -> fixed target pattern.
    names = ["Aromi", "Blue Spice", "Cotto", "Zizzi", "The Mill", "Wildwood"]
    return [Example(prompt=f"Table: name[{n}]\nText:", target=f" {n} is a pub.") for n in names]


def tuned_model(tokenizer):
    model = make_tiny_llama(len(tokenizer))
    quantize_(model, BCQConfig(bits=3, group_size=32, method="offset"))
    prepare_for_alphatuning(model, AlphaTuningConfig())
    return model


def alpha_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_twenty_steps_lower_the_loss(tokenizer, examples):
    model = tuned_model(tokenizer)
    config = TrainConfig(
        learning_rate=2e-2,
        batch_size=3,
        max_steps=20,
        checkpoint_every=0,
        label_smoothing=0.0,
        warmup_ratio=0.0,
    )
    result = train(model, tokenizer, examples, config, eval_examples=examples, progress=False)
    assert result.steps == 20 and len(result.train_losses) == 20
    assert sum(result.train_losses[-3:]) / 3 < 0.9 * sum(result.train_losses[:3]) / 3
    assert result.eval_losses[-1][1] < result.train_losses[0]


def test_only_scales_change(tokenizer, examples):
    model = tuned_model(tokenizer)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "alpha1" not in n}
    train(
        model,
        tokenizer,
        examples,
        TrainConfig(max_steps=3, batch_size=2, checkpoint_every=0),
        progress=False,
    )
    for name, tensor in model.state_dict().items():
        if "alpha1" not in name:
            assert torch.equal(tensor, frozen[name]), name


def test_resume_continues_exactly(tokenizer, examples, tmp_path, monkeypatch):
    # The module, not the function the package face exports under the same name.
    train_module = importlib.import_module("alphatune.train")

    config = TrainConfig(max_steps=6, batch_size=2, checkpoint_every=3, learning_rate=1e-2)
    straight = tuned_model(tokenizer)
    train(straight, tokenizer, examples, config, progress=False)

    # Kill the run right after its step-3 checkpoint is written.
    save = train_module._save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(
            tuned_model(tokenizer), tokenizer, examples, config, output_dir=tmp_path, progress=False
        )
    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    # A "new process": fresh model on the same base resumes from the step-3 checkpoint.
    resumed = tuned_model(tokenizer)
    result = train(
        resumed, tokenizer, examples, config, output_dir=tmp_path, resume=True, progress=False
    )
    assert result.resumed_from == 3 and len(result.train_losses) == 6
    for name, value in alpha_state(straight).items():
        torch.testing.assert_close(alpha_state(resumed)[name], value, rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(tokenizer, examples, tmp_path):
    model = tuned_model(tokenizer)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(
            model,
            tokenizer,
            examples,
            TrainConfig(max_steps=1),
            output_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_resume_on_another_base_is_refused(tokenizer, examples, tmp_path):
    model = tuned_model(tokenizer)
    train(
        model,
        tokenizer,
        examples,
        TrainConfig(max_steps=2, batch_size=2),
        output_dir=tmp_path,
        fingerprint="aaaa",
        progress=False,
    )
    with pytest.raises(CheckpointError, match="belongs to base aaaa"):
        train(
            tuned_model(tokenizer),
            tokenizer,
            examples,
            TrainConfig(max_steps=2, batch_size=2),
            output_dir=tmp_path,
            resume=True,
            fingerprint="bbbb",
            progress=False,
        )


def test_untrainable_model_is_refused(tokenizer, examples):
    model = make_tiny_llama(len(tokenizer))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        train(model, tokenizer, examples, TrainConfig(max_steps=1), progress=False)


def test_loss_ignores_prompt_and_padding():
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], labels[0, 2:4])
    torch.testing.assert_close(causal_lm_loss(logits, labels), expected)


@pytest.mark.parametrize(
    "field,value", [("learning_rate", 0), ("batch_size", 0), ("warmup_ratio", 1.5)]
)
def test_bad_train_settings(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_resume_with_different_settings_is_refused(tokenizer, examples, tmp_path):
    config = TrainConfig(max_steps=2, batch_size=2, checkpoint_every=1)
    train(tuned_model(tokenizer), tokenizer, examples, config, output_dir=tmp_path, progress=False)
    changed = TrainConfig(max_steps=4, batch_size=3, checkpoint_every=1)
    with pytest.raises(CheckpointError, match="batch_size: 2 -> 3"):
        train(
            tuned_model(tokenizer),
            tokenizer,
            examples,
            changed,
            output_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_a_crash_while_swapping_checkpoints_keeps_the_old_one(tokenizer, examples, tmp_path):
    config = TrainConfig(max_steps=2, batch_size=2, checkpoint_every=1)
    train(tuned_model(tokenizer), tokenizer, examples, config, output_dir=tmp_path, progress=False)
    # Simulate a crash after the old checkpoint was renamed aside but before the new one landed.
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    result = train(
        tuned_model(tokenizer),
        tokenizer,
        examples,
        config,
        output_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert result.resumed_from == 2
