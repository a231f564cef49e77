"""Giving memory back (``alphatune.memory``): no tensor of a quantized model is left a view of
the memory-mapped checkpoint it was loaded from, and dead pages of a loaded base's file leave."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from proc_memory import resident_kib, written_back
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from alphatune import BCQConfig, quantize_
from alphatune.embedding import BCQTable
from alphatune.memory import own_mapped_tensors, page_out, release_free_memory

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


def _save_clean(tensors, path) -> None:
    save_file(tensors, path)
    written_back(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_page_out_drops_a_mapped_tensors_pages_and_keeps_its_values(tmp_path):
    path = tmp_path / "weights.safetensors"
    values = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    _save_clean({"w": values, "small": torch.ones(3)}, path)
    loaded = load_file(path)  # views of the mapped file
    assert not loaded["w"].untyped_storage().resizable()
    assert torch.equal(loaded["w"], values)  # reads every page: resident now
    before = resident_kib(path)
    advised = page_out(loaded["w"])
    assert advised >= 4 * 2**20 - 2 * mmap.PAGESIZE  # whole pages inside the tensor
    assert resident_kib(path) <= before - advised // 1024 + 8
    assert torch.equal(loaded["w"], values)  # read back from the file
    assert page_out(values) == 0  # memory the process owns is never advised
    assert page_out(loaded["small"]) == 0  # no whole page inside: its neighbours may be in use


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_a_table_loaded_from_a_mapped_file_leaves_its_planes_out(tmp_path):
    """A compact table settles into level bytes; the file's planes behind it are paged out as
    they are converted (not all resident beside the bytes), and the table reads the same."""
    weight = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    table = BCQTable.from_weight(weight)
    assert table.byte_form
    path = tmp_path / "table.safetensors"
    _save_clean(table.state_dict(), path)
    tensors = load_file(path)  # views of the mapped file
    planes = tensors["packed_codes"]
    assert planes.numel() >= 8 * mmap.PAGESIZE
    planes.sum()  # read once (as hashing does): every page resident
    before = resident_kib(path)
    loaded = BCQTable.from_weight(torch.zeros(8192, 64))
    loaded.load_state_dict(tensors, assign=True)  # as load_quantized does: no copy
    assert loaded.byte_form
    assert resident_kib(path) <= before - planes.numel() // 1024 // 2
    assert torch.equal(loaded.levels, table.levels)
