"""The compact embedding and LM head (``alphatune.embedding``, the default ``BCQConfig``): one
8-bit table for the lookup and the tied head, its products, save/load, sizes, adapters, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sealing import reseal_base
from tiny_models import INPUT, VOCAB, logits, make_tiny_llama, quantized_tiny_llama, sqnr_db
from torch import nn

from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    bcq,
    kernels,
    prepare_for_alphatuning,
    quantize_,
    quantize_lm_head,
)
from alphatune import embedding as compact
from alphatune.adapters import (
    base_fingerprint,
    head_fingerprint,
    load_adapter,
    load_quantized,
    save_adapter,
    save_quantized,
)
from alphatune.bases import _fingerprint
from alphatune.embedding import BCQEmbedding, BCQHead, BCQTable, linear_reference
from alphatune.files import BASE_CONFIG, BASE_WEIGHTS
from alphatune.lm_head import replaced_head
from alphatune.packing import pack_codes
from alphatune.quantize import quantized_layers
from alphatune.tuning import trainable_state

CONFIG = BCQConfig(bits=3, group_size=32, method="offset")  # compact embedding and head: defaults


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


@pytest.fixture(scope="module")
def table() -> BCQTable:
    # 300 rows: with CHUNK_ROWS patched to 128, the batched head runs two full chunks and a tail.
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    weight[5, 7] = 2.0  # an outlier: the offset grid covers it (its group's range grows)
    return BCQTable.from_weight(weight)


# ---------------------------------------------------------------- the table
def test_table_is_a_close_8_bit_fit(table: BCQTable) -> None:
    weight = torch.randn(300, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    weight[5, 7] = 2.0
    planes = table.plane_codes()
    assert planes.dtype == torch.uint8 and planes.shape == (8, 300, 8)
    assert table.byte_form and "packed_codes" not in dict(table.named_buffers())
    # Uniform 8-bit per group of 64 (the initialisation, kept): ~40 dB on a Gaussian weight.
    assert sqnr_db(weight, table.dequantize()) > 35
    # Scales are fp16 values (saved losslessly in fp16).
    for tensor in (table.alpha, table.offset):
        assert torch.equal(tensor.half().float(), tensor)


def test_fit_is_the_offset_fit_without_refinement() -> None:
    """``fit_table`` is ``bcq.fit_offset(..., iterations=0)`` (round to nearest on each group's
    range, largest scale first), computed on integer levels: the same codes and scales, except
    that a group's step is at least ``MIN_STEP`` (so fp16 scales stay geometric)."""
    weight = torch.randn(70, 96, generator=torch.Generator().manual_seed(7))
    weight[3, 5] = 9.0
    weight[4] = 0.5  # a constant row: every level 0, the step raised to MIN_STEP
    packed, alpha, offset = compact.fit_table(weight, 8, 32)
    reference = bcq.fit_offset(weight, 8, 32, iterations=0)
    assert torch.equal(packed, pack_codes(reference.codes))
    others = torch.arange(70) != 4
    assert torch.equal(alpha[:, others], reference.alpha[:, others])
    assert torch.equal(offset[others], reference.offset[others])
    assert torch.equal(alpha[-1, 4], torch.full((3,), compact.MIN_STEP / 2))
    dense = kernels.dequantize_packed(packed, alpha, offset, 32, 96)
    assert torch.allclose(dense[4], weight[4], atol=compact.MIN_STEP)


def test_rows_are_the_dequantized_rows(table: BCQTable) -> None:
    ids = torch.tensor([[0, 299, 5], [5, 17, 0]])
    dense = table.dequantize()
    rows = table.rows(ids)
    assert rows.shape == (2, 3, 64) and rows.dtype == torch.float32
    assert torch.equal(rows, dense[ids])
    assert torch.equal(table.rows(torch.tensor(7)), dense[7])  # a 0-d id, like nn.Embedding


@pytest.mark.parametrize("bad", [300, -1])
def test_rows_refuse_ids_out_of_range(table: BCQTable, bad: int) -> None:
    with pytest.raises(IndexError, match=r"out of range: expected 0\.\.299"):
        table.rows(torch.tensor([1, bad]))


@pytest.mark.parametrize("tokens", [1, 3, 100], ids=lambda t: f"tokens={t}")
def test_linear_matches_the_dense_reference(
    table: BCQTable, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compact, "CHUNK_ROWS", 128)  # 100 tokens: chunks of 128, 128, 44 rows
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = table.linear(x)
    torch.testing.assert_close(out, linear_reference(table, x), rtol=1e-4, atol=1e-4)
    # The same through a leading batch dimension.
    with torch.no_grad():
        batched = table.linear(x.view(1, tokens, 64))
    torch.testing.assert_close(batched[0], out, rtol=1e-5, atol=1e-5)


def test_linear_gives_the_input_gradient(table: BCQTable, monkeypatch) -> None:
    monkeypatch.setattr(compact, "CHUNK_ROWS", 128)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weights = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(6))
    (table.linear(x) * weights).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    (linear_reference(table, reference) * weights).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-4)
    assert not any(t.requires_grad for t in table.buffers())


def test_no_dense_copy_is_kept(table: BCQTable) -> None:
    """Neither a lookup nor a product leaves a float tensor of the table's size anywhere in the
    module (its state or its kernel cache)."""
    module = copy.deepcopy(table)
    with torch.no_grad():
        module.linear(torch.randn(1, 64))
        module.linear(torch.randn(100, 64))
        module.rows(torch.arange(300))
    held = list(module.state_dict().values()) + [
        value for _, value in module._cache._forms.values() if isinstance(value, torch.Tensor)
    ]
    big_floats = [t for t in held if t.is_floating_point() and t.numel() >= 300 * 64]
    assert not big_floats


# ---------------------------------------------------------------- the model: tied and untied
def test_default_makes_one_shared_table_for_a_tied_model() -> None:
    model = make_tiny_llama(VOCAB)
    fp32 = logits(model)
    original = model.get_input_embeddings().weight.detach().clone()
    quantize_(model, CONFIG)

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, BCQEmbedding) and isinstance(head, BCQHead)
    assert head.shared and head.table is embedding  # tied: one table
    record = replaced_head(model)
    assert record is not None and record.shares == "model.embed_tokens" and not record.untied
    names = list(model.state_dict())
    assert not any(n.startswith("lm_head") for n in names)
    assert not any(
        t.is_floating_point() and t.numel() >= VOCAB * 64 for t in model.state_dict().values()
    )
    # The lookup gives the table's rows, the head multiplies by the same table.
    dense = embedding.dequantize()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(embedding(ids), dense[ids])
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), hidden @ dense.T, rtol=1e-4, atol=1e-4)
    # The table is close to the fp32 embedding; the logits are as close to the same blocks with
    # the fp32 embedding and head as 8 bits allow (the 3-bit blocks are far from fp32 anyway).
    assert sqnr_db(original, dense) > 35
    kept = quantized_tiny_llama(lm_head="keep", embedding="keep")
    assert sqnr_db(logits(kept), logits(model)) > 30
    assert sqnr_db(fp32, logits(model)) == pytest.approx(sqnr_db(fp32, logits(kept)), abs=0.5)


def test_compact_logits_equal_the_model_with_the_dense_table() -> None:
    """Everything else equal, the compact model computes what the model would with the table's
    dense values as its (tied) fp32 embedding: the torch reference of the whole path."""
    model = quantized_tiny_llama(lm_head="keep", embedding="keep")
    reference = copy.deepcopy(model)
    quantize_lm_head(model, BCQConfig())
    with torch.no_grad():
        reference.get_input_embeddings().weight.copy_(model.get_input_embeddings().dequantize())
    assert reference.lm_head.weight is reference.get_input_embeddings().weight
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-4)
    one = INPUT[:1, :1]  # one token: the LUT kernel (where this CPU has one)
    torch.testing.assert_close(logits(model, one), logits(reference, one), rtol=1e-4, atol=1e-4)


def test_untied_model_gets_two_tables(llama_base: nn.Module, tmp_path) -> None:
    model = copy.deepcopy(llama_base)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    head_weight = model.lm_head.weight.detach().clone()
    quantize_(model, CONFIG)
    embedding, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(embedding, BCQEmbedding) and isinstance(head, BCQHead)
    assert not head.shared and head.table is not embedding
    assert sqnr_db(head_weight, head.table.dequantize()) > 35
    record = replaced_head(model)
    assert record is not None and record.shares is None and record.table == head.table.spec
    save_quantized(model, tmp_path / "base", CONFIG)
    loaded, _ = load_quantized(tmp_path / "base")
    assert torch.equal(logits(model), logits(loaded))
    assert not loaded.lm_head.shared and replaced_head(loaded) == record
    with safe_open(tmp_path / "base" / BASE_WEIGHTS, "pt") as f:
        assert f.get_tensor("lm_head.own_table.packed_codes").shape == (8, 128, 8)


@pytest.mark.parametrize(
    ("lm_head", "embedding"), [("keep", "compact"), ("compact", "keep"), ("bf16", "compact")]
)
def test_mixed_modes_untie(lm_head: str, embedding: str, tmp_path) -> None:
    model = quantized_tiny_llama(lm_head=lm_head, embedding=embedding)
    assert model.config.tie_word_embeddings is False
    assert isinstance(model.get_input_embeddings(), BCQEmbedding) == (embedding == "compact")
    head = model.lm_head
    if lm_head == "compact":
        assert isinstance(head, BCQHead) and not head.shared and replaced_head(model).untied
    if lm_head == "keep":
        assert type(head) is nn.Linear and head.weight.dtype == torch.float32
    config = BCQConfig(bits=3, group_size=32, method="offset")
    save_quantized(model, tmp_path / "base", config)
    loaded, _ = load_quantized(tmp_path / "base")
    assert torch.equal(logits(model), logits(loaded))
    assert type(loaded.lm_head) is type(head)


# ---------------------------------------------------------------- files
def test_round_trip_is_bit_exact_and_stays_tied(tmp_path) -> None:
    model = quantized_tiny_llama()
    save_quantized(model, tmp_path / "base", CONFIG)
    loaded, _ = load_quantized(tmp_path / "base")
    assert torch.equal(logits(model), logits(loaded))
    assert torch.equal(logits(model, INPUT[:1, :1]), logits(loaded, INPUT[:1, :1]))
    assert loaded.lm_head.table is loaded.get_input_embeddings()
    assert base_fingerprint(loaded) == base_fingerprint(model)
    assert head_fingerprint(loaded) == head_fingerprint(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    qconfig = json.loads((tmp_path / "base" / BASE_CONFIG).read_text())["quantization_config"]
    assert qconfig["format_version"] == 3
    assert qconfig["embedding"] == "compact" and qconfig["lm_head"] == "compact"
    assert qconfig["input_embedding"]["table"] == {
        "rows": VOCAB,
        "dim": 64,
        "bits": 8,
        "group_size": 64,
    }
    assert qconfig["head"]["shares"] == "model.embed_tokens"


def test_saved_base_is_smaller_than_with_the_fp32_embedding(tmp_path) -> None:
    compact_dir, keep_dir = tmp_path / "compact", tmp_path / "keep"
    save_quantized(quantized_tiny_llama(), compact_dir, CONFIG)
    save_quantized(quantized_tiny_llama(lm_head="keep", embedding="keep"), keep_dir, CONFIG)
    compact_tensors, keep_tensors = (
        load_file(compact_dir / BASE_WEIGHTS),
        load_file(keep_dir / BASE_WEIGHTS),
    )
    table = {k: v for k, v in compact_tensors.items() if k.startswith("model.embed_tokens")}
    assert {k: v.dtype for k, v in table.items()} == {
        "model.embed_tokens.packed_codes": torch.uint8,
        "model.embed_tokens.alpha": torch.float16,
        "model.embed_tokens.offset": torch.float16,
    }
    table_bytes = sum(v.numel() * v.element_size() for v in table.values())
    assert table_bytes == VOCAB * 64 + 2 * 9 * VOCAB  # 8 bits + 9 fp16 scales per row (g = 64)
    saved = {
        name: sum(v.numel() * v.element_size() for v in load_file(d / BASE_WEIGHTS).values())
        for name, d in (("compact", compact_dir), ("keep", keep_dir))
    }
    assert saved["keep"] - saved["compact"] == 4 * VOCAB * 64 - table_bytes
    assert set(keep_tensors) - set(compact_tensors) == {"model.embed_tokens.weight"}


def test_old_tied_base_still_loads_and_keeps_its_fingerprint(tmp_path) -> None:
    """A base written before compact tables (version 1, fp32 tied embedding) loads as it was, and
    its fingerprint is the blocks-only hash adapters recorded then."""
    model = quantized_tiny_llama(lm_head="keep", embedding="keep")
    save_quantized(model, tmp_path / "base", CONFIG)
    qconfig = json.loads((tmp_path / "base" / BASE_CONFIG).read_text())["quantization_config"]
    assert qconfig["format_version"] == 1 and "input_embedding" not in qconfig
    loaded, _ = load_quantized(tmp_path / "base")
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert base_fingerprint(loaded) == _fingerprint(list(quantized_layers(loaded)))
    assert qconfig["fingerprint"] == base_fingerprint(loaded)


# ---------------------------------------------------------------- adapters
def test_tables_are_never_tuned_and_adapters_round_trip(tmp_path) -> None:
    model = quantized_tiny_llama()
    report = prepare_for_alphatuning(model, AlphaTuningConfig(train="all_alpha"))
    names = list(trainable_state(model))
    assert names and not any(n.startswith(("model.embed_tokens", "lm_head")) for n in names)
    assert report.total == sum(p.numel() for p in make_tiny_llama(VOCAB).parameters())
    # Gradients reach the blocks' scales through the compact head (chunked backward).
    loss = model(input_ids=INPUT, labels=INPUT).loss
    loss.backward()
    grads = [model.get_parameter(n).grad for n in names]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).mul_(1.05)
    tuned = logits(model)
    save_quantized(quantized_tiny_llama(), tmp_path / "base", CONFIG)
    save_adapter(model, tmp_path / "adapter", AlphaTuningConfig(train="all_alpha"))
    base, _ = load_quantized(tmp_path / "base")
    load_adapter(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(base), tuned, rtol=1e-5, atol=1e-5)


def test_fingerprint_covers_the_compact_embedding(tmp_path) -> None:
    compact_model = quantized_tiny_llama()
    kept = quantized_tiny_llama(lm_head="keep", embedding="keep")
    # Same blocks, different embedding: different bases for an adapter.
    assert base_fingerprint(compact_model) != base_fingerprint(kept)
    other = copy.deepcopy(compact_model)
    with torch.no_grad():
        other.get_input_embeddings().alpha[0, 0, 0] *= 2
    assert base_fingerprint(other) != base_fingerprint(compact_model)
    prepare_for_alphatuning(kept)
    save_adapter(kept, tmp_path / "adapter", AlphaTuningConfig())
    with pytest.raises(CheckpointError, match="load the base it was tuned on"):
        load_adapter(compact_model, tmp_path / "adapter")


# ---------------------------------------------------------------- bad input
def _base(tmp_path) -> tuple:
    directory = tmp_path / "base"
    save_quantized(quantized_tiny_llama(), directory, CONFIG)
    return directory, directory / BASE_CONFIG, directory / BASE_WEIGHTS


def test_missing_embedding_tensor_names_the_file_and_tensor(tmp_path) -> None:
    directory, _, weights = _base(tmp_path)
    tensors = load_file(weights)
    del tensors["model.embed_tokens.alpha"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.embed_tokens.alpha") as info:
        load_quantized(directory)
    assert str(weights) in str(info.value)
    reseal_base(directory)  # past the integrity record: the model's own check names it too
    with pytest.raises(CheckpointError, match=r"missing \['model.embed_tokens.alpha'\]") as info:
        load_quantized(directory)
    assert str(weights) in str(info.value)


def test_corrupt_embedding_tensor_names_the_file_and_tensor(tmp_path) -> None:
    directory, _, weights = _base(tmp_path)
    tensors = load_file(weights)
    tensors["model.embed_tokens.packed_codes"][0, 0, 0] ^= 1
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.embed_tokens.packed_codes'") as info:
        load_quantized(directory)
    assert str(weights) in str(info.value)


def test_wrong_embedding_shape_names_the_file_and_tensor(tmp_path) -> None:
    directory, _, weights = _base(tmp_path)
    tensors = load_file(weights)
    tensors["model.embed_tokens.offset"] = tensors["model.embed_tokens.offset"][:-1].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    reseal_base(directory)
    with pytest.raises(CheckpointError, match="'model.embed_tokens.offset' has shape") as info:
        load_quantized(directory)
    assert str(weights) in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q: q["input_embedding"]["table"].update(rows=VOCAB + 1), "is a 129x64 table"),
        (lambda q: q["input_embedding"]["table"].update(group_size=48), "does not divide dim"),
        (
            lambda q: (
                q["input_embedding"].update(module="model.nope"),
                q["head"].update(shares="model.nope"),
            ),
            "'model.nope' does not exist",
        ),
        (lambda q: q.pop("input_embedding"), "shares the table of 'model.embed_tokens'"),
        (lambda q: q["head"].update(shares=None), "exactly one"),
    ],
    ids=["rows", "group", "module", "no-embedding", "no-table"],
)
def test_bad_embedding_record_names_the_file(tmp_path, change, message: str) -> None:
    directory, config_path, _ = _base(tmp_path)
    config = json.loads(config_path.read_text())
    change(config["quantization_config"])
    config_path.write_text(json.dumps(config))
    reseal_base(directory)
    with pytest.raises(CheckpointError, match=message) as info:
        load_quantized(directory)
    assert str(config_path) in str(info.value)


# ---------------------------------------------------------------- what is kept
def test_unsupported_modules_are_kept_with_a_reason(caplog) -> None:
    class Renormalising(nn.Embedding):
        pass

    model = make_tiny_llama(VOCAB)
    model.model.embed_tokens = Renormalising(VOCAB, 64)
    with caplog.at_level("INFO", logger="alphatune.lm_head"):
        quantize_(model, CONFIG)
    assert type(model.model.embed_tokens) is Renormalising
    assert "an nn.Embedding subclass" in caplog.text
    assert isinstance(model.lm_head, BCQHead) and not model.lm_head.shared


def test_scaled_embedding_keeps_its_scale() -> None:
    class Scaled(nn.Embedding):  # as Gemma's: rows times embed_scale
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.embed_scale = 8.0

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    module = Scaled(VOCAB, 64)
    compacted = BCQEmbedding.from_embedding(module)
    assert compacted.scale == 8.0
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(compacted(ids), compacted.rows(ids) * 8.0)
    assert sqnr_db(module(ids).detach(), compacted(ids)) > 35
