from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alphatune.data import encode_prompt
from alphatune.evaluate import generate
from alphatune.models import load_tokenizer

PROMPTS = [
    "Table: name[The Vaults], eatType[pub], priceRange[more than £30]\nText:",
    "Table: name[A]\nText:",
    "Triples: Aarhus Airport | cityServed | Aarhus, Denmark ; Aarhus Airport | location | x\nText:",
    "Hello",
    "Table: name[B], food[Thai]\nText:",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # larger than the default so outputs depend on the whole prompt
    )
    return LlamaForCausalLM(config).eval()


def reference_greedy(model: LlamaForCausalLM, tokenizer: Any, prompt: str, steps: int) -> str:
    """Plain greedy decoding with full forward passes: no cache, no padding."""
    ids = encode_prompt(tokenizer, prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + new])).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip().split("\n", 1)[0].strip()


def test_batched_greedy_equals_one_at_a_time(model: LlamaForCausalLM, tokenizer: Any) -> None:
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=3, progress=False)
    single = [
        generate(model, tokenizer, [prompt], max_new_tokens=8, batch_size=1, progress=False)[0]
        for prompt in PROMPTS
    ]
    assert batched == single
    assert len(set(batched)) == len(PROMPTS)  # distinct answers: the check is not vacuous


def test_greedy_matches_plain_decoding(model: LlamaForCausalLM, tokenizer: Any) -> None:
    answers = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=6, progress=True)
    assert answers == [reference_greedy(model, tokenizer, prompt, 6) for prompt in PROMPTS[:2]]


def test_beam_search_runs(model: LlamaForCausalLM, tokenizer: Any) -> None:
    answers = generate(
        model, tokenizer, PROMPTS[:3], max_new_tokens=5, num_beams=3, batch_size=2, progress=False
    )
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    assert all("\n" not in answer for answer in answers)


def test_edge_cases(model: LlamaForCausalLM, tokenizer: Any) -> None:
    assert generate(model, tokenizer, [], progress=False) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["a", ""], progress=False)
    model.train()
    generate(model, tokenizer, ["a"], max_new_tokens=1, progress=False)
    assert model.training
    model.eval()


# ---------------------------------------------------------------- the decode engine
@pytest.fixture(scope="module")
def quantized_model(tokenizer: Any) -> LlamaForCausalLM:
    from alphatune import BCQConfig, quantize_

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    quantize_(model, BCQConfig(bits=3, group_size=16, method="offset"))
    return model.eval()


needs_engine = pytest.mark.skipif(
    __import__("alphatune.kernels", fromlist=["lut_kernel"]).lut_kernel() is None,
    reason="no LUT kernel on this CPU: the engine does not run here",
)


@needs_engine
def test_engine_answers_equal_the_transformers_path(quantized_model, tokenizer, monkeypatch):
    from alphatune.engine import Engine

    built = []
    original = Engine.build
    monkeypatch.setattr(Engine, "build", lambda *a, **k: built.append(1) or original(*a, **k))
    options = {"max_new_tokens": 10, "batch_size": 3, "progress": False}
    engine = generate(quantized_model, tokenizer, PROMPTS, engine=True, **options)
    assert built  # the engine ran
    transformers = generate(quantized_model, tokenizer, PROMPTS, engine=False, **options)
    assert engine == transformers
    assert len(set(engine)) > 1
    # The default (engine=None, ALPHATUNE_ENGINE unset) is the engine where it serves.
    built.clear()
    assert generate(quantized_model, tokenizer, PROMPTS, **options) == engine and built
    built.clear()
    monkeypatch.setenv("ALPHATUNE_ENGINE", "off")
    assert generate(quantized_model, tokenizer, PROMPTS, **options) == engine and not built


@needs_engine
def test_stop_strings_cut_answers_on_both_paths(quantized_model, tokenizer):
    options = {"max_new_tokens": 10, "progress": False}
    full = generate(quantized_model, tokenizer, PROMPTS[:3], **options)
    words = [answer.split()[1] for answer in full if len(answer.split()) > 2]
    assert words, full
    stop = [" " + words[0]]
    expected = [answer.split(stop[0])[0].strip() for answer in full]
    for engine in (True, False):
        got = generate(quantized_model, tokenizer, PROMPTS[:3], stop=stop, engine=engine, **options)
        assert got == expected, engine
    assert expected != full


@needs_engine
def test_sampling_is_seeded(quantized_model, tokenizer):
    options = {"max_new_tokens": 8, "progress": False, "do_sample": True, "temperature": 2.0}
    first = generate(quantized_model, tokenizer, PROMPTS, seed=1, batch_size=2, **options)
    # Per-prompt generators: the batch size does not change a prompt's sample.
    assert generate(quantized_model, tokenizer, PROMPTS, seed=1, batch_size=5, **options) == first
    assert generate(quantized_model, tokenizer, PROMPTS, seed=2, **options) != first
    greedy = generate(quantized_model, tokenizer, PROMPTS, max_new_tokens=8, progress=False)
    assert first != greedy
    top1 = generate(quantized_model, tokenizer, PROMPTS, seed=1, top_k=1, **options)
    assert top1 == greedy
    with pytest.raises(ValueError, match="beam"):
        generate(quantized_model, tokenizer, PROMPTS, num_beams=2, **options)


def test_fallback_is_logged_and_required_engine_says_why(model, quantized_model, tokenizer, caplog):
    from alphatune.errors import UnsupportedModelError

    with caplog.at_level(logging.INFO, logger="alphatune.evaluate.generation"):
        plain = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4, progress=False)
    assert "not the decode engine" in caplog.text and "BCQLinear" in caplog.text
    assert plain == generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4, progress=False,
                             engine=False)  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="BCQLinear"):
        generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, progress=False, engine=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alphatune.evaluate.generation"):
        beams = generate(quantized_model, tokenizer, PROMPTS[:2], max_new_tokens=4, num_beams=2,
                         progress=False)  # fmt: skip
    assert "beam search" in caplog.text and len(beams) == 2


def test_engine_setting_is_checked(model, tokenizer, monkeypatch):
    monkeypatch.setenv("ALPHATUNE_ENGINE", "maybe")
    with pytest.raises(ValueError, match="ALPHATUNE_ENGINE"):
        generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, progress=False)
