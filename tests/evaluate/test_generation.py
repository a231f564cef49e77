from __future__ import annotations

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
