"""The embedded SmolLM2-135M-Instruct, quantized with the default method: quality floors and tuning.

One fp model is loaded per run; calibration and evaluation use small WikiText-2 / E2E slices so the
module stays within a few minutes on 2 CPU cores; the 2- and 4-bit quantizations run only with
``-m slow``. Bounds are stated next to what was measured.
"""

from __future__ import annotations

import copy

import pytest
import torch

from alphatune import AlphaTuningConfig, BCQConfig, TrainConfig, prepare_for_alphatuning, quantize_
from alphatune.data import load_e2e_train, load_text_tokens
from alphatune.evaluate import perplexity
from alphatune.train import evaluate_loss, train

pytestmark = pytest.mark.model

CALIBRATION = (16, 512)  # sequences x tokens from WikiText-2 valid
EVAL_TOKENS = 4096  # WikiText-2 test: 8 windows of 512
# Measured with these slices (fp 26.4 on this slice): see docs/quantization.md for full sweeps.
BOUND_4BIT = 1.3  # the target: 4 bits within 1.3x the unquantized perplexity
# 3 bits: 1.51x on the 8,192-token slice with 32 calibration sequences (docs/quantization.md);
# the bound leaves room for this module's smaller slices. 4 bits with groups aligned to the
# source's Q4_1 blocks flatters any method (MODELS.md), so 3 bits is the honest floor.
BOUND_3BIT = 1.8


@pytest.fixture(scope="module")
def fp_model():
    from alphatune.models import load_model

    return load_model()


@pytest.fixture(scope="module")
def calibration(tokenizer, shared_data_dir):
    n, length = CALIBRATION
    tokens = load_text_tokens(
        tokenizer, shared_data_dir / "wikitext-2" / "valid.txt", max_tokens=n * length
    )
    return tokens.reshape(n, length)


@pytest.fixture(scope="module")
def eval_tokens(tokenizer, shared_data_dir):
    return load_text_tokens(
        tokenizer, shared_data_dir / "wikitext-2" / "test.txt", max_tokens=EVAL_TOKENS
    )


@pytest.fixture(scope="module")
def fp_perplexity(fp_model, eval_tokens):
    return perplexity(fp_model, eval_tokens, progress=False)


def _quantize(fp_model, calibration, eval_tokens, bits):
    """(model, perplexity, summary) of the fp model quantized at ``bits``, default method."""
    model = copy.deepcopy(fp_model)
    summary = quantize_(model, BCQConfig(bits=bits), calibration=calibration)
    assert summary.layers == 210
    return model, perplexity(model, eval_tokens, progress=False), summary


@pytest.fixture(scope="module")
def three_bits(fp_model, calibration, eval_tokens):
    return _quantize(fp_model, calibration, eval_tokens, 3)


@pytest.fixture(scope="module")
def sweep(three_bits, fp_model, calibration, eval_tokens):
    """bits -> (model, perplexity, summary) for 2, 3 and 4 bits (each quantization takes minutes,
    so the 2- and 4-bit ones run only with ``-m slow``)."""
    return {
        2: _quantize(fp_model, calibration, eval_tokens, 2),
        3: three_bits,
        4: _quantize(fp_model, calibration, eval_tokens, 4),
    }


def test_three_bits_stays_within_its_floor(three_bits, fp_perplexity):
    _, ppl, _ = three_bits
    assert ppl <= BOUND_3BIT * fp_perplexity, (ppl, fp_perplexity, ppl / fp_perplexity)


def test_three_bits_stores_at_most_three_and_a_half_bits(three_bits):
    _, _, summary = three_bits
    assert summary.bits_per_weight <= 3.5
    assert summary.compression_vs_fp32 > 9


@pytest.mark.slow
def test_four_bits_stays_close_to_full_precision(sweep, fp_perplexity):
    _, ppl, _ = sweep[4]
    assert ppl <= BOUND_4BIT * fp_perplexity, (ppl, fp_perplexity)


@pytest.mark.slow
def test_fewer_bits_are_worse(sweep, fp_perplexity):
    ppl = {bits: value for bits, (_, value, _) in sweep.items()}
    assert ppl[2] > ppl[3] > ppl[4] > fp_perplexity * 0.99, ppl


def test_twenty_steps_lower_the_e2e_loss(three_bits, tokenizer, shared_data_dir):
    model = copy.deepcopy(three_bits[0])
    prepare_for_alphatuning(model, AlphaTuningConfig())
    examples = load_e2e_train(shared_data_dir / "e2e" / "train.csv", limit=160)
    held_out = load_e2e_train(shared_data_dir / "e2e" / "dev.csv", limit=24)
    from alphatune.data import encode_example

    encoded = [encode_example(tokenizer, ex, 128) for ex in held_out]
    before = evaluate_loss(model, encoded, tokenizer.pad_token_id)
    torch.manual_seed(0)
    result = train(
        model,
        tokenizer,
        examples,
        TrainConfig(max_steps=20, batch_size=8, checkpoint_every=0),
        progress=False,
    )
    after = evaluate_loss(model, encoded, tokenizer.pad_token_id)
    assert result.steps == 20
    assert after < before - 0.1, (before, after)
