"""Mixed-task batches: each batch row with its own adapter (``alphatune.mixed``)."""

from __future__ import annotations

import pytest
import torch
from sealing import reseal_adapter
from tiny_models import make_tiny_llama

from alphatune import AlphaTuningConfig, BCQConfig, quantize_
from alphatune.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    save_adapter,
    unload_adapter,
)
from alphatune.errors import CheckpointError, ConfigError
from alphatune.evaluate import generate
from alphatune.kernels import bcq_matmul_mixed
from alphatune.kernels.reference import bcq_matmul_reference
from alphatune.mixed import adapter_bank, adapter_rows, load_adapters, unload_adapters
from alphatune.packing import pack_codes, packed_width
from alphatune.quantize import quantized_layers
from alphatune.tuning import prepare_for_alphatuning

CONFIG = BCQConfig(bits=3, group_size=32, method="offset")
TASKS = ("e2e", "webnlg", "dart")
PROMPTS = [
    "Table: name[The Vaults], eatType[pub], priceRange[more than £30]\nText:",
    "Table: name[A]\nText:",
    "Triples: Aarhus Airport | cityServed | Aarhus, Denmark\nText:",
    "Hello",
    "Table: name[B], food[Thai]\nText:",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def quantized_model(vocab_size: int = 128, seed: int = 0):
    model = make_tiny_llama(vocab_size, seed=seed)
    quantize_(model, CONFIG)
    return model


def save_task_adapters(model, directory, seed: int = 0, config=None) -> dict[str, object]:
    """One adapter per task: α₁ scaled by random factors, then the model's α₁ put back."""
    config = config or AlphaTuningConfig()
    prepare_for_alphatuning(model, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    original = {n: p.detach().clone() for n, p in trainable.items()}
    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for task in TASKS:
        with torch.no_grad():
            for name, p in trainable.items():
                factor = 1 + 0.5 * torch.randn(p.shape, generator=generator)
                p.copy_(original[name] * factor)
        paths[task] = save_adapter(model, directory / task, config)
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(original[name])
    model.requires_grad_(False)
    return paths


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny quantized Llama and three α₁ adapters for it (vocabulary 128)."""
    model = quantized_model()
    paths = save_task_adapters(model, tmp_path_factory.mktemp("adapters"))
    return model, paths


@pytest.fixture
def model(served):
    model, _ = served
    yield model
    unload_adapters(model)
    unload_adapter(model)
    model.eval()


def logits(model, ids, attention_mask=None):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=attention_mask).logits


def single_adapter_logits(model, paths, rows, ids, attention_mask=None):
    """Row by row, with the row's adapter loaded by load_adapter (None: the base)."""
    out = []
    for index, name in enumerate(rows):
        if name is None:
            unload_adapter(model)
        else:
            load_adapter(model, paths[name])
        mask = None if attention_mask is None else attention_mask[index : index + 1]
        out.append(logits(model, ids[index : index + 1], mask))
    unload_adapter(model)
    return torch.cat(out)


def test_mixed_batch_equals_each_row_with_its_adapter(model, served):
    _, paths = served
    rows = ["e2e", "webnlg", None, "e2e", "dart"]
    ids = torch.randint(0, 128, (len(rows), 9), generator=torch.Generator().manual_seed(1))
    expected = single_adapter_logits(model, paths, rows, ids)
    bank = load_adapters(model, paths)
    assert bank.names == TASKS and adapter_bank(model) is bank
    with bank.rows(rows):
        mixed = logits(model, ids)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)
    # Not vacuous: the adapters change the logits.
    for a, b in [(0, 1), (0, 2), (1, 4)]:
        assert (expected[a] - expected[b]).abs().max() > 1e-2
    assert (expected[0] - logits(model, ids[:1])[0]).abs().max() > 1e-2  # e2e vs the base


def test_mixed_batch_with_left_padding(model, served):
    _, paths = served
    rows = ["dart", "e2e", "webnlg"]
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    expected = single_adapter_logits(model, paths, rows, ids, mask)
    load_adapters(model, paths)
    with adapter_rows(model, rows):
        mixed = logits(model, ids, mask)
    torch.testing.assert_close(mixed[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_rows_are_scoped_and_removal_restores_the_model(model, served):
    _, paths = served
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    before = logits(model, ids)
    bank = load_adapters(model, paths)
    assert torch.equal(logits(model, ids), before)  # a bank alone changes nothing
    with bank.rows(["e2e", "e2e"]):
        with bank.rows(["webnlg", None]):  # nested: the inner rows win, then the outer return
            inner = logits(model, ids)
        outer = logits(model, ids)
    assert not torch.allclose(inner, outer)
    assert torch.equal(logits(model, ids), before)
    assert all(layer.adapter_rows is None for _, layer in quantized_layers(model))
    assert not any("alpha1_bank" in name for name in model.state_dict())  # never saved
    bank.remove()
    assert adapter_bank(model) is None and not bank.loaded
    assert all(layer.alpha1_bank is None for _, layer in quantized_layers(model))
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(ConfigError, match="bank was removed"):
        bank.indices(["e2e", "e2e"])
    with pytest.raises(ConfigError, match="no adapters are loaded"), adapter_rows(model, ["e2e"]):
        pass


def test_loading_a_new_bank_replaces_the_old_one(model, served):
    _, paths = served
    first = load_adapters(model, {"e2e": paths["e2e"]})
    second = load_adapters(model, {"dart": paths["dart"]})
    assert not first.loaded and adapter_bank(model) is second
    assert all(layer.alpha1_bank.shape[0] == 2 for _, layer in quantized_layers(model))


def test_bank_base_is_the_base_even_with_an_adapter_loaded(model, served):
    _, paths = served
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    base = logits(model, ids)
    load_adapter(model, paths["webnlg"])
    tuned = logits(model, ids)
    bank = load_adapters(model, {"e2e": paths["e2e"]})
    with bank.rows([None]):
        torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits(model, ids), tuned)  # outside rows: the loaded adapter


def test_unknown_adapter_names_the_loaded_ones(model, served):
    _, paths = served
    bank = load_adapters(model, paths)
    with pytest.raises(ConfigError, match=r"unknown adapter\(s\) 'wmt'.*'e2e', 'webnlg', 'dart'"):
        bank.indices(["e2e", "wmt"])
    with pytest.raises(ConfigError, match="one name per batch row"), bank.rows("e2e"):
        pass
    with pytest.raises(ConfigError, match="empty"):
        bank.indices([])
    with pytest.raises(ConfigError, match="no adapters given"):
        load_adapters(model, {})


def test_row_count_must_match_the_batch(model, served):
    _, paths = served
    bank = load_adapters(model, paths)
    ids = torch.randint(0, 128, (3, 4))
    mismatch = pytest.raises(ConfigError, match=r"name 2 batch rows.*shape \(3, 4, 64\)")
    with mismatch, bank.rows(["e2e", "dart"]):
        logits(model, ids)


def test_training_with_adapter_rows_is_refused(model, served):
    _, paths = served
    bank = load_adapters(model, paths)
    prepare_for_alphatuning(model)
    ids = torch.randint(0, 128, (2, 4))
    try:
        with bank.rows(["e2e", "dart"]), pytest.raises(ConfigError, match="inference only"):
            model(input_ids=ids).logits.sum().backward()
        model.train()
        with bank.rows(["e2e", "dart"]), pytest.raises(ConfigError, match="model.eval"):
            logits(model, ids)
    finally:
        model.requires_grad_(False)


def test_adapter_for_another_base_is_refused_naming_the_file(model, served, tmp_path):
    _, paths = served
    other = quantized_model(seed=1)
    foreign = save_task_adapters(other, tmp_path, seed=5)
    with pytest.raises(CheckpointError, match=r"webnlg/adapter_config.json.*tuned on base"):
        load_adapters(model, {"e2e": paths["e2e"], "webnlg": foreign["webnlg"]})
    assert adapter_bank(model) is None  # nothing changed


def test_adapter_that_tuned_more_than_alpha1_is_refused(tmp_path):
    model = quantized_model()
    paths = save_task_adapters(model, tmp_path, config=AlphaTuningConfig(train="all_alpha"))
    with pytest.raises(CheckpointError, match=rf"e2e/{ADAPTER_WEIGHTS}.*alpha_rest"):
        load_adapters(model, paths)


def test_adapter_covering_some_layers_keeps_the_base_elsewhere(model, served, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    _, paths = served
    partial = tmp_path / "partial"
    partial.mkdir()
    tensors = load_file(paths["e2e"] / ADAPTER_WEIGHTS)
    kept = {n: t for n, t in tensors.items() if n.startswith("model.layers.0.")}
    save_file(kept, partial / ADAPTER_WEIGHTS)
    config = json.loads((paths["e2e"] / ADAPTER_CONFIG).read_text())
    config["tensors"] = {n: list(t.shape) for n, t in kept.items()}
    (partial / ADAPTER_CONFIG).write_text(json.dumps(config))
    reseal_adapter(partial)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    expected = single_adapter_logits(model, {"partial": partial}, ["partial", None], ids)
    bank = load_adapters(model, {"partial": partial})
    with bank.rows(["partial", None]):
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    # Layers no adapter changes keep the plain forward.
    for name, layer in quantized_layers(model):
        assert (layer.alpha1_bank is None) == name.startswith("model.layers.1."), name


# ---------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def served_text(tmp_path_factory, tokenizer):
    """A tiny quantized Llama with the real tokenizer's vocabulary, and three adapters."""
    model = quantized_model(len(tokenizer))
    paths = save_task_adapters(model, tmp_path_factory.mktemp("text-adapters"), seed=7)
    return model, paths


def one_at_a_time(model, tokenizer, paths, adapters, **options):
    answers = []
    for prompt, name in zip(PROMPTS, adapters, strict=True):
        load_adapter(model, paths[name])
        answers += generate(model, tokenizer, [prompt], batch_size=1, progress=False, **options)
    unload_adapter(model)
    return answers


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beams=3"])
def test_generate_with_an_adapter_per_prompt(served_text, tokenizer, num_beams):
    model, paths = served_text
    adapters = ["e2e", "webnlg", "dart", "e2e", "webnlg"]
    options = {"max_new_tokens": 6, "num_beams": num_beams}
    expected = one_at_a_time(model, tokenizer, paths, adapters, **options)
    load_adapters(model, paths)
    try:
        mixed = generate(
            model, tokenizer, PROMPTS, adapters=adapters, batch_size=3, progress=False, **options
        )
    finally:
        unload_adapters(model)
    assert mixed == expected
    # Not vacuous: the same prompt gets different answers from different adapters.
    others = one_at_a_time(
        model, tokenizer, paths, ["dart", "e2e", "webnlg", "dart", "e2e"], **options
    )
    assert all(other != answer for other, answer in zip(others, expected, strict=True))


def test_generate_adapter_errors(served_text, tokenizer):
    model, paths = served_text
    with pytest.raises(ConfigError, match="no adapter named 'e2e' is loaded"):
        generate(model, tokenizer, PROMPTS[:1], adapters=["e2e"], progress=False)
    load_adapters(model, paths)
    try:
        with pytest.raises(ConfigError, match="2 prompts, 1 adapters"):
            generate(model, tokenizer, PROMPTS[:2], adapters=["e2e"], progress=False)
        with pytest.raises(ConfigError, match="no adapter named 'nope'.*'e2e', 'webnlg', 'dart'"):
            generate(model, tokenizer, PROMPTS[:2], adapters=["e2e", "nope"], progress=False)
        with pytest.raises(ConfigError, match="got the string"):
            generate(model, tokenizer, PROMPTS[:1], adapters="e", progress=False)
    finally:
        unload_adapters(model)


# ---------------------------------------------------------------- kernel contract
@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda q: f"bits={q}")
@pytest.mark.parametrize("offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize(
    "in_features,group_size", [(64, 64), (64, 16), (100, 20), (100, 25), (24, 8)]
)
@pytest.mark.parametrize("tokens", [11, 80], ids=["decode-sized", "prefill-sized"])
def test_mixed_kernel_equals_a_per_token_loop(
    bits, offset, in_features, group_size, tokens, exact_tables
):
    """Decode-sized inputs take the LUT kernel, prefill-sized the dequantize path."""
    generator = torch.Generator().manual_seed(bits * 1000 + in_features + group_size + offset)
    out, adapters = 7, 3
    groups = in_features // group_size
    codes = torch.randint(0, 2, (bits, out, in_features), generator=generator) * 2 - 1
    packed = pack_codes(codes.to(torch.int8))
    assert packed.shape == (bits, out, packed_width(in_features))
    bank = torch.rand(adapters, out, groups, generator=generator) + 0.1
    alpha_rest = torch.rand(bits - 1, out, groups, generator=generator)
    offsets = torch.randn(out, groups, generator=generator) if offset else None
    x = torch.randn(tokens, in_features, generator=generator)
    token_adapter = torch.randint(0, adapters, (tokens,), generator=generator)
    token_adapter[:adapters] = torch.arange(adapters)  # every adapter appears
    y = bcq_matmul_mixed(
        x, packed, bank, token_adapter, alpha_rest, offsets, group_size, in_features
    )
    expected = torch.stack(
        [
            bcq_matmul_reference(
                x[t : t + 1],
                packed,
                torch.cat([bank[token_adapter[t]][None], alpha_rest]),
                offsets,
                group_size,
                in_features,
            )[0]
            for t in range(tokens)
        ]
    )
    assert y.shape == (tokens, out) and y.dtype == x.dtype
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)  # only summation order differs


@pytest.mark.parametrize(
    "config",
    [AlphaTuningConfig(granularity="row"), AlphaTuningConfig(multiplier=True)],
    ids=["row", "group-multiplier"],
)
def test_multiplier_adapters_load_alone_and_in_mixed_batches(tmp_path, config):
    """An adapter of α₁ multipliers (per row or per group) loads onto a fresh base, and a mixed
    batch gives each row what it gets alone with its adapter."""
    tuned = quantized_model()
    paths = save_task_adapters(tuned, tmp_path, config=config)
    fresh = quantized_model()  # same seed and config: the same base, no row scales yet
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    rows = ["e2e", None, "dart"]
    alone = single_adapter_logits(fresh, paths, rows, ids)
    assert not torch.allclose(alone[0], alone[1])  # the adapter changes the logits
    load_adapters(fresh, paths)
    with adapter_rows(fresh, rows):
        mixed = logits(fresh, ids)
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4)
    unload_adapters(fresh)
    torch.testing.assert_close(logits(fresh, ids[1:2]), alone[1:2])  # unloaded: the base again
