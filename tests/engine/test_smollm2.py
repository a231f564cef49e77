"""The decode engine on the embedded SmolLM2 at 3 bits (slow: loads and quantizes the model)."""

from __future__ import annotations

import pytest
import torch

from alphatune import BCQConfig, quantize_
from alphatune.engine import Engine, generate_ids, prompt_logits
from alphatune.kernels import lut_kernel

pytestmark = [
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.numba,
    pytest.mark.skipif(lut_kernel() is None, reason="no LUT kernel on this CPU"),
]

PROMPTS = [
    "The capital of France is",
    "Table: name[The Vaults], eatType[pub], priceRange[more than £30]\nText:",
    "def fibonacci(n):",
    "Once upon a time",
    "The three primary colours are",
    "Question: what is 12 times 7?\nAnswer:",
]
TOP2_TOLERANCE = 1e-2  # float32 logits of ~20 in magnitude; summation orders differ


@pytest.fixture(scope="module")
def model():
    from alphatune.models import load_model

    model = load_model()
    quantize_(model, BCQConfig(bits=3, method="offset"))
    return model.eval()


def test_smollm2_logits_and_greedy_tokens_match_transformers(model, tokenizer, record_property):
    engine = Engine.build(model)
    ids = tokenizer.encode(PROMPTS[0])
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids])).logits[0]
    ours = torch.from_numpy(prompt_logits(engine, ids))
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=2e-3)

    steps = 32
    encoded = [tokenizer.encode(p) for p in PROMPTS]
    ours = generate_ids(engine, encoded, max_new_tokens=steps)
    near_ties = 0
    for ids, done in zip(encoded, ours, strict=True):
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([ids]), attention_mask=torch.ones_like(torch.tensor([ids])),
                max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        reference = out.sequences[0, len(ids) :].tolist()
        for step, (a, b) in enumerate(zip(done.tokens, reference, strict=True)):
            if a != b:
                top2 = out.scores[step][0].topk(2).values
                assert float(top2[0] - top2[1]) < TOP2_TOLERANCE, (ids, step)
                near_ties += 1
                break
    record_property("greedy_divergences", f"{near_ties}/{len(PROMPTS)}")
    print(f"SmolLM2 greedy divergences at a near tie: {near_ties} of {len(PROMPTS)} prompts")
    assert near_ties <= 2
