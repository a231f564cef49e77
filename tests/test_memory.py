"""Giving memory back after quantizing (``alphatune.memory``): no tensor of a quantized model
is left a view of the memory-mapped checkpoint it was loaded from."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from alphatune import BCQConfig, quantize_
from alphatune.memory import own_mapped_tensors, release_free_memory

CONFIG = BCQConfig(bits=3, group_size=32, method="offset")


def _mapped(model) -> list[str]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if not t.untyped_storage().resizable()]


def test_a_loaded_model_holds_views_of_its_checkpoint(tiny_model_dir):
    """The premise: transformers loads safetensors without copying."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert _mapped(model)


def test_quantize_leaves_no_view_of_the_checkpoint(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    quantize_(model, CONFIG)
    assert _mapped(model) == []
    norm = model.model.norm.weight
    assert norm.untyped_storage().resizable()
    # The copies are the same values: the model computes what it did before the copy.
    after = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert after.shape == before.shape and torch.isfinite(after).all()


def test_quantize_on_load_leaves_no_view_of_the_checkpoint(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=CONFIG)
    assert _mapped(model) == []


def test_own_mapped_tensors_keeps_values_and_ties(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    copied = own_mapped_tensors(model)
    assert copied > 0 and _mapped(model) == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert own_mapped_tensors(model) == 0
    release_free_memory()  # a no-op where the C library has no malloc_trim; never raises
