"""Named adapters resident on one model: load_adapter(adapter_name=), set_adapter,
delete_adapter, unload_adapter, and mixed batches over resident adapters (issue 14, item 2)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_llama

import alphatune
from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    ConfigError,
    active_adapter,
    adapter_names,
    delete_adapter,
    load_adapter,
    prepare_for_alphatuning,
    quantize_,
    save_adapter,
    set_adapter,
    unload_adapter,
)
from alphatune.mixed import adapter_bank, adapter_rows, bank_for, load_adapters, unload_adapters

CONFIG = BCQConfig(bits=3, group_size=32, method="offset")
IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
TASKS = ("e2e", "webnlg", "dart")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.fixture
def served(tmp_path):
    """A tiny quantized Llama, its base logits, and three different α₁ adapters for it, with the
    logits each gives (measured by setting α₁ directly, not through the verbs under test)."""
    model = make_tiny_llama(128, seed=0)
    quantize_(model, CONFIG)
    tuning = AlphaTuningConfig()
    prepare_for_alphatuning(model, tuning)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    original = {n: p.detach().clone() for n, p in trainable.items()}
    base = logits(model)
    generator = torch.Generator().manual_seed(0)
    paths, expected = {}, {}
    for task in TASKS:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(original[name] * (1 + 0.5 * torch.randn(p.shape, generator=generator)))
        expected[task] = logits(model)
        paths[task] = save_adapter(model, tmp_path / task, tuning, metadata={"task": task})
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(original[name])
    model.requires_grad_(False)
    assert torch.equal(logits(model), base)
    return model, base, paths, expected


def test_verbs_are_importable_from_the_package():
    for verb in (
        "load_adapter",
        "set_adapter",
        "delete_adapter",
        "unload_adapter",
        "active_adapter",
        "adapter_names",
    ):
        assert verb in alphatune.__all__


def test_named_adapters_stay_resident_and_switch_without_files(served, tmp_path):
    model, base, paths, expected = served
    for task in TASKS:
        config = load_adapter(model, paths[task], adapter_name=task)
        assert config["metadata"]["task"] == task
        assert active_adapter(model) == task  # loading activates, as it always did
        assert torch.allclose(logits(model), expected[task], atol=1e-5)
    assert adapter_names(model) == TASKS
    # Switching reads no file: remove them all from disk first.
    for path in paths.values():
        for file in path.iterdir():
            file.unlink()
    for task in ("webnlg", "e2e", "dart", "e2e"):
        set_adapter(model, task)
        assert active_adapter(model) == task
        assert torch.allclose(logits(model), expected[task], atol=1e-5)
    unload_adapter(model)
    assert active_adapter(model) is None
    assert torch.equal(logits(model), base)
    assert adapter_names(model) == TASKS  # unloading keeps them resident
    set_adapter(model, "webnlg")
    assert torch.allclose(logits(model), expected["webnlg"], atol=1e-5)


def test_load_without_activating_keeps_the_active_adapter(served):
    model, _, paths, expected = served
    load_adapter(model, paths["e2e"], adapter_name="e2e")
    load_adapter(model, paths["dart"], adapter_name="dart", activate=False)
    assert active_adapter(model) == "e2e"
    assert torch.allclose(logits(model), expected["e2e"], atol=1e-5)
    set_adapter(model, "dart")
    assert torch.allclose(logits(model), expected["dart"], atol=1e-5)


def test_loading_under_a_resident_name_replaces_it(served):
    model, _, paths, expected = served
    load_adapter(model, paths["e2e"])  # the default name, as before names existed
    assert adapter_names(model) == ("default",) and active_adapter(model) == "default"
    load_adapter(model, paths["webnlg"])
    assert adapter_names(model) == ("default",)
    assert torch.allclose(logits(model), expected["webnlg"], atol=1e-5)
    # Reloading the inactive name keeps the active one active.
    load_adapter(model, paths["dart"], adapter_name="other", activate=False)
    load_adapter(model, paths["e2e"], adapter_name="other", activate=False)
    set_adapter(model, "other")
    assert torch.allclose(logits(model), expected["e2e"], atol=1e-5)


def test_delete_adapter(served):
    model, base, paths, expected = served
    load_adapter(model, paths["e2e"], adapter_name="e2e")
    load_adapter(model, paths["dart"], adapter_name="dart")
    delete_adapter(model, "e2e")  # not active: the active one stays
    assert adapter_names(model) == ("dart",) and active_adapter(model) == "dart"
    assert torch.allclose(logits(model), expected["dart"], atol=1e-5)
    delete_adapter(model, "dart")  # active: the base comes back
    assert adapter_names(model) == () and active_adapter(model) is None
    assert torch.equal(logits(model), base)
    with pytest.raises(
        ConfigError, match=r"no adapter named 'dart' is loaded on this model \(loaded: none\)"
    ):
        set_adapter(model, "dart")


def test_unknown_and_bad_names_are_clear_errors(served):
    model, _, paths, _ = served
    load_adapter(model, paths["e2e"], adapter_name="e2e")
    with pytest.raises(ConfigError, match=r"no adapter named 'nope' .*loaded: 'e2e'"):
        set_adapter(model, "nope")
    with pytest.raises(ConfigError, match="no adapter named 'nope'"):
        delete_adapter(model, "nope")
    for bad in ("", None, 3):
        with pytest.raises(ConfigError, match="non-empty strings"):
            load_adapter(model, paths["dart"], adapter_name=bad)
    assert adapter_names(model) == ("e2e",)


def test_wrong_base_adapter_names_both_fingerprints_and_changes_nothing(served, tmp_path):
    model, _, paths, expected = served
    other = make_tiny_llama(128, seed=1)
    quantize_(other, CONFIG)
    prepare_for_alphatuning(other, AlphaTuningConfig())
    foreign = save_adapter(other, tmp_path / "foreign", AlphaTuningConfig())
    load_adapter(model, paths["e2e"], adapter_name="e2e")
    with pytest.raises(CheckpointError) as error:
        load_adapter(model, foreign, adapter_name="foreign")
    message = str(error.value)
    assert alphatune.base_fingerprint(other) in message
    assert alphatune.base_fingerprint(model) in message
    assert adapter_names(model) == ("e2e",) and active_adapter(model) == "e2e"
    assert torch.allclose(logits(model), expected["e2e"], atol=1e-5)


def test_mixed_batches_over_resident_adapters(served):
    model, base, paths, expected = served
    for task in TASKS:
        load_adapter(model, paths[task], adapter_name=task, activate=False)
    rows = ["dart", None, "e2e"]
    bank = bank_for(model, rows)
    with adapter_rows(model, rows):
        mixed = logits(model)
    assert torch.allclose(mixed[0], expected["dart"][0], atol=1e-5)
    assert torch.equal(mixed[1], base[1])
    assert torch.allclose(mixed[2], expected["e2e"][2], atol=1e-5)
    assert bank_for(model, ["e2e"]) is bank  # a bank that serves the rows is reused
    # Replacing or deleting an adapter in the bank drops the bank: its α₁ would be stale.
    load_adapter(model, paths["webnlg"], adapter_name="dart", activate=False)
    assert adapter_bank(model) is None and not bank.loaded
    bank = bank_for(model, ["dart", "e2e"])
    delete_adapter(model, "e2e")
    assert adapter_bank(model) is None and not bank.loaded


def test_unload_adapters_forgets_what_load_adapters_loaded(served):
    model, base, paths, _ = served
    load_adapter(model, paths["dart"], adapter_name="mine")
    load_adapters(model, {"e2e": paths["e2e"], "webnlg": paths["webnlg"]})
    assert adapter_names(model) == ("mine", "e2e", "webnlg")
    assert active_adapter(model) == "mine"  # load_adapters activates none
    set_adapter(model, "e2e")
    unload_adapters(model)
    assert adapter_names(model) == ("mine",)
    assert active_adapter(model) is None and torch.equal(logits(model), base)
