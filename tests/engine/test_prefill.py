"""The dense prefill (``alphatune.engine.prefill``) against the engine's LUT path (tiny Llamas)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import (
    BLOCK_CASES,
    VOCAB,
    model_with_two_adapters,
    parametrize_cases,
    quantized,
    random_prompts,
)

from alphatune import BCQConfig
from alphatune.engine import Engine, generate_ids, prefill, prompt_logits
from alphatune.engine import model as engine_model
from alphatune.errors import ConfigError
from alphatune.kernels import lut_kernel

pytestmark = [
    pytest.mark.numba,
    pytest.mark.skipif(lut_kernel() is None, reason="no LUT kernel on this CPU"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def long_prompt(length: int = 90, seed: int = 2) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (length,), generator=generator).tolist()


def dense_states(engine: Engine, ids: list[int], dtype: torch.dtype):
    """Every position's final-normed hidden state through the dense path, and its cache."""
    cache = engine.new_cache(1, len(ids))
    hidden = engine.dense.run(
        engine.embed(np.asarray(ids)), [prefill.Prompt(0, len(ids))], cache,
        engine.rotary(len(ids)), 1, dtype, every_position=True,
    )  # fmt: skip
    return hidden, cache


def lut_states(engine: Engine, ids: list[int]):
    n = len(ids)
    cache = engine.new_cache(1, n)
    zeros = np.zeros(n, np.int64)
    hidden = engine.forward(
        np.asarray(ids), zeros, np.arange(n, dtype=np.int64), zeros, cache, engine.rotary(n), 1
    )
    return hidden, cache


@parametrize_cases(BLOCK_CASES)
def test_float32_dense_prefill_equals_the_lut_path(config, llama, exact_tables):
    """Same hidden states and the same keys and values in the cache, up to summation order."""
    engine = Engine.build(quantized(config, **llama))
    ids = long_prompt()
    dense, dense_cache = dense_states(engine, ids, torch.float32)
    lut, lut_cache = lut_states(engine, ids)
    torch.testing.assert_close(torch.from_numpy(dense), torch.from_numpy(lut), rtol=1e-4, atol=1e-4)
    for ours, theirs in (
        (dense_cache.keys, lut_cache.keys),
        (dense_cache.values, lut_cache.values),
    ):
        torch.testing.assert_close(torch.from_numpy(ours), torch.from_numpy(theirs), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip


def sqnr_db(signal: np.ndarray, approximation: np.ndarray) -> float:
    noise = np.square(signal - approximation).mean()
    return float(10 * np.log10(np.square(signal).mean() / noise))


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_bfloat16_dense_prefill_is_close_to_float32(architecture):
    """bfloat16 GEMMs keep the logits within a few tenths of a percent: a floor, not allclose
    (Gemma-3: its GELU in place on bfloat16, its sandwich norms of bfloat16 outputs)."""
    config = BCQConfig(bits=3, group_size=32, method="offset")
    engine = Engine.build(quantized(config, architecture=architecture))
    ids = long_prompt()
    exact = engine.logits(dense_states(engine, ids, torch.float32)[0])
    approximate = engine.logits(dense_states(engine, ids, torch.bfloat16)[0])
    assert sqnr_db(exact, approximate) > 35
    assert (exact.argmax(-1) == approximate.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_a_batch_of_prompts_prefills_together(monkeypatch, exact_tables, architecture):
    """Prompts of any lengths prefill in one dense pass (one dequantization per layer for all)
    once they hold enough tokens together; the tokens are those of the LUT path (Gemma-3: each
    prompt past its sliding window)."""
    config = BCQConfig(bits=3, group_size=32, method="offset")
    engine = Engine.build(quantized(config, architecture=architecture))
    # (The last prompt is shorter than the tiny Gemma-3's window: no mask of its own.)
    prompts = [long_prompt(40), random_prompts(1, seed=4)[0], long_prompt(30, seed=9), [7, 8, 9]]
    monkeypatch.setenv(prefill.PREFILL_ENV, "lut")
    expected = [d.tokens for d in generate_ids(engine, prompts, max_new_tokens=12)]
    asked = []

    def dense_from_64(tokens: int) -> torch.dtype | None:
        asked.append(tokens)
        return torch.float32 if tokens >= 64 else None

    monkeypatch.setattr(engine_model, "dense_dtype", dense_from_64)
    passes = []
    run = engine.dense.run
    monkeypatch.setattr(engine.dense, "run", lambda *a, **k: passes.append(a[1]) or run(*a, **k))
    batched = [d.tokens for d in generate_ids(engine, prompts, max_new_tokens=12)]
    assert asked == [sum(len(p) for p in prompts)] and asked[0] >= 64
    assert passes == [[prefill.Prompt(r, len(p)) for r, p in enumerate(prompts)]]
    assert batched == expected
    alone = generate_ids(engine, prompts[1:2], max_new_tokens=12)  # too few tokens alone
    assert asked[-1] == len(prompts[1]) and len(passes) == 1
    assert alone[0].tokens == expected[1]


def test_a_big_batch_prefills_in_passes_of_whole_prompts(monkeypatch, exact_tables):
    """Activations are bounded: passes of at most MAX_PASS_TOKENS (a longer prompt alone), the
    same tokens as one pass."""
    assert prefill.passes([prefill.Prompt(r, n) for r, n in enumerate([3, 4, 9, 2, 2])], 8) == [
        [prefill.Prompt(0, 3), prefill.Prompt(1, 4)],
        [prefill.Prompt(2, 9)],
        [prefill.Prompt(3, 2), prefill.Prompt(4, 2)],
    ]
    engine = Engine.build(quantized(BCQConfig(bits=3, group_size=32, method="offset")))
    prompts = [long_prompt(40, seed=s) for s in range(5)]
    monkeypatch.setenv(prefill.PREFILL_ENV, "float32")
    expected = [d.tokens for d in generate_ids(engine, prompts, max_new_tokens=6)]
    monkeypatch.setattr(engine_model, "MAX_PASS_TOKENS", 90)
    sizes = []
    run = engine.dense.run
    monkeypatch.setattr(
        engine.dense, "run", lambda *a, **k: sizes.append(len(a[1])) or run(*a, **k)
    )
    assert [d.tokens for d in generate_ids(engine, prompts, max_new_tokens=6)] == expected
    assert sizes == [2, 2, 1]


def test_prefill_leaves_the_cache_decode_continues_from(exact_tables, monkeypatch):
    """After a dense prefill, decode's logits are those of the LUT path over the whole text."""
    engine = Engine.build(quantized(BCQConfig(bits=3, group_size=32, method="offset")))
    ids = long_prompt(75)
    monkeypatch.setenv(prefill.PREFILL_ENV, "float32")
    [done] = generate_ids(engine, [ids], max_new_tokens=6)
    assert len(done.tokens) == 6
    text = ids + done.tokens[:-1]
    greedy = prompt_logits(engine, text)[len(ids) - 1 :].argmax(-1).tolist()
    assert greedy == done.tokens


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_mixed_adapter_rows_prefill_with_their_own_scales(
    tmp_path, monkeypatch, exact_tables, architecture
):
    """Banked projections take each row's α₁ from the bank in the dense path too."""
    from alphatune.mixed import load_adapters, unload_adapters

    model, paths = model_with_two_adapters(tmp_path, architecture)
    # Interleaved sets: a set's tokens are gathered from non-adjacent prompts.
    prompts = [long_prompt(70, seed=s) for s in (1, 2, 3, 4)]
    bank = load_adapters(model, paths)
    try:
        engine = Engine.build(model, use_bank=True)
        sets = bank.indices(["a", "b", None, "a"]).tolist()
        monkeypatch.setenv(prefill.PREFILL_ENV, "lut")
        expected = generate_ids(engine, prompts, max_new_tokens=8, adapter_sets=sets)
        monkeypatch.setenv(prefill.PREFILL_ENV, "float32")
        dense = generate_ids(engine, prompts, max_new_tokens=8, adapter_sets=sets)
    finally:
        unload_adapters(model)
    assert [d.tokens for d in dense] == [d.tokens for d in expected]
    assert len({tuple(d.tokens) for d in dense}) > 1  # the adapters differ


def test_prefill_reads_the_scales_decode_reads(monkeypatch, exact_tables):
    """Scales changed in the layer after the engine was built reach decode only where its kernel
    reads them in place (AVX2), not where it keeps a copy (AVX-512): prefill follows decode."""
    model = quantized(BCQConfig(bits=3, group_size=32, method="offset"))
    engine = Engine.build(model)
    with torch.no_grad():
        for layer in engine.spec.blocks[0].modules():
            if hasattr(layer, "alpha1"):
                layer.alpha1.mul_(1.5)
    prompts = [long_prompt(70)]
    monkeypatch.setenv(prefill.PREFILL_ENV, "lut")
    expected = generate_ids(engine, prompts, max_new_tokens=8)[0].tokens
    monkeypatch.setenv(prefill.PREFILL_ENV, "float32")
    assert generate_ids(engine, prompts, max_new_tokens=8)[0].tokens == expected


def test_auto_counts_the_tokens_per_scale_set(tmp_path, monkeypatch):
    """Each adapter in a batch costs a dequantization: ``auto`` weighs the tokens per set."""
    from alphatune.mixed import load_adapters, unload_adapters

    model, paths = model_with_two_adapters(tmp_path)
    bank = load_adapters(model, paths)
    asked = []
    monkeypatch.setattr(engine_model, "dense_dtype", lambda tokens: asked.append(tokens))
    try:
        engine = Engine.build(model, use_bank=True)
        prompts = [long_prompt(50, seed=s) for s in (1, 2)]
        generate_ids(engine, prompts, max_new_tokens=1, adapter_sets=bank.indices(["a", "b"]))
        generate_ids(engine, prompts, max_new_tokens=1, adapter_sets=bank.indices(["a", "a"]))
    finally:
        unload_adapters(model)
    assert asked == [50, 100]


def test_the_setting_chooses_the_path(monkeypatch):
    monkeypatch.setenv(prefill.PREFILL_ENV, "lut")
    assert prefill.dense_dtype(10_000) is None
    monkeypatch.setenv(prefill.PREFILL_ENV, " BF16 ")
    assert prefill.dense_dtype(1) is torch.bfloat16
    monkeypatch.setenv(prefill.PREFILL_ENV, "float32")
    assert prefill.dense_dtype(1) is torch.float32
    monkeypatch.delenv(prefill.PREFILL_ENV)
    monkeypatch.setattr(prefill, "native_bfloat16", lambda: True)
    assert prefill.dense_dtype(prefill.MIN_TOKENS - 1) is None
    assert prefill.dense_dtype(prefill.MIN_TOKENS) is torch.bfloat16
    monkeypatch.setattr(prefill, "native_bfloat16", lambda: False)
    assert prefill.dense_dtype(prefill.MIN_FLOAT32_TOKENS - 1) is None
    assert prefill.dense_dtype(prefill.MIN_FLOAT32_TOKENS) is torch.float32
    monkeypatch.setenv(prefill.PREFILL_ENV, "amx")
    with pytest.raises(ConfigError, match="ALPHATUNE_PREFILL='amx'; choose one of auto, bf16"):
        prefill.dense_dtype(100)


def test_a_prompt_longer_than_the_cache_is_refused():
    engine = Engine.build(quantized(BCQConfig(bits=3, group_size=32, method="offset")))
    cache = engine.new_cache(1, 10)
    with pytest.raises(ConfigError, match="longer than the 10-position cache"):
        engine.dense.run(engine.embed(np.arange(20)), [prefill.Prompt(0, 20)], cache,
                         engine.rotary(20), 1, torch.float32)  # fmt: skip
    with pytest.raises(ConfigError, match="every prompt needs a token"):
        engine.dense.run(engine.embed(np.arange(8)), [prefill.Prompt(0, 8), prefill.Prompt(1, 0)],
                         engine.new_cache(2, 10), engine.rotary(10), 1, torch.float32)  # fmt: skip
    with pytest.raises(ConfigError, match="20 embeddings for prompts of lengths"):
        engine.dense.run(engine.embed(np.arange(20)), [prefill.Prompt(0, 8)], cache,
                         engine.rotary(20), 1, torch.float32)  # fmt: skip
