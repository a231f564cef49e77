"""The decode engine against the transformers path on the same quantized weights (tiny Llamas)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from proc_memory import mapped_library, resident_kib, written_back
from tiny_models import TINY_GEMMA3_WINDOW, make_tiny_gemma3, make_tiny_llama

from alphatune import BCQConfig, quantize_
from alphatune.engine import (
    Engine,
    Sampling,
    choose_tokens,
    filter_logits,
    generate_ids,
    prompt_logits,
)
from alphatune.errors import ConfigError, UnsupportedModelError
from alphatune.kernels import lut_kernel
from alphatune.layers import BCQLinear

pytestmark = [
    pytest.mark.numba,
    pytest.mark.skipif(lut_kernel() is None, reason="no LUT kernel on this CPU"),
]

VOCAB = 128
# Greedy tokens may differ from the reference only where the reference's two best logits are
# this close: the engine and transformers sum in different orders (float32).
TOP2_TOLERANCE = 1e-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def quantized(
    config: BCQConfig, seed: int = 0, architecture: str = "llama", **overrides: object
) -> torch.nn.Module:
    """A tiny model quantized with ``config``: a Llama, or with ``architecture="gemma3"`` a
    Gemma-3 (``tiny_models.make_tiny_gemma3``); ``overrides`` go into its config."""
    if architecture == "gemma3":
        model = make_tiny_gemma3(VOCAB, seed=seed, **overrides)
        quantize_(model, config)
        return model.eval()
    model = make_tiny_llama(VOCAB, seed=seed)
    if overrides:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        settings = model.config.to_dict() | overrides
        model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    quantize_(model, config)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return quantized(BCQConfig(bits=3, group_size=32, method="offset"))


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine.build(model)


def random_prompts(count: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=generator).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


# Block layouts the engine must serve: (id, quantizer config, ``quantized``'s keywords: config
# overrides, and ``architecture`` for a Gemma-3). Shared with tests/engine/test_prefill.py, which
# runs the same blocks through the dense prefill.
BLOCK_CASES = [
    ("q3-g32-offset", BCQConfig(bits=3, group_size=32, method="offset"), {}),
    ("q2-g64-greedy", BCQConfig(bits=2, group_size=64, method="greedy"), {}),
    ("q4-row-alternating", BCQConfig(bits=4, method="alternating"), {}),
    ("mixed-bits",
     BCQConfig(bits=3, group_size=32, method="offset", layer_bits={"*.v_proj": 4, "*.down_proj": 2}),
     {}),
    ("bias-g16", BCQConfig(bits=3, group_size=16, method="offset"), {"attention_bias": True}),
    ("rows-padded", BCQConfig(bits=3, group_size=8, method="offset"),
     {"hidden_size": 48, "intermediate_size": 80}),
    # Gemma-3's block: sandwich and query/key norms, tanh-GELU, sliding windows, two ropes; and
    # every layer sliding (one rotary table, the sliding layers').
    ("gemma3", BCQConfig(bits=3, group_size=32, method="offset"), {"architecture": "gemma3"}),
    ("gemma3-all-sliding", BCQConfig(bits=3, group_size=32, method="offset"),
     {"architecture": "gemma3", "layer_types": ["sliding_attention"] * 3}),
]  # fmt: skip
HEAD_CASES = [
    ("head-bf16", BCQConfig(bits=3, group_size=32, method="offset", lm_head="bf16"), {}),
    ("head-bcq8",
     BCQConfig(bits=3, group_size=32, method="offset", lm_head="bcq", lm_head_bits=8), {}),
    ("head-keep", BCQConfig(bits=3, group_size=32, method="offset", lm_head="keep"), {}),
]  # fmt: skip


def parametrize_cases(cases: list[tuple[str, BCQConfig, dict]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "config, llama", [case[1:] for case in cases], ids=[case[0] for case in cases]
    )


@parametrize_cases(BLOCK_CASES + HEAD_CASES)
def test_logits_match_the_transformers_forward(config, llama, exact_tables):
    model = quantized(config, **llama)
    engine = Engine.build(model)
    # 70 tokens: prefill runs in two chunks (engine.generate.PREFILL_CHUNK = 64).
    # (Prompts past the tiny Gemma-3's window of 5 exercise its sliding layers.)
    for ids in ([5], random_prompts(1)[0], random_prompts(1, seed=3)[0] * 4):
        expected = reference_logits(model, ids[:70])
        # A bf16 head rounds its input to 8 bits of mantissa: a 1e-6 difference in the hidden
        # state can move a rounding, so its logits agree to bf16's resolution only.
        tolerance = 1e-2 if config.lm_head == "bf16" else 1e-4
        torch.testing.assert_close(
            torch.from_numpy(prompt_logits(engine, ids[:70])),
            expected,
            rtol=tolerance,
            atol=tolerance,
        )


def reference_greedy(model, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers generate, batch 1, and the gap between its two best logits at every step."""
    with torch.inference_mode():
        output = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in output.scores]
    return output.sequences[0, len(ids) :].tolist(), gaps


def near_tie_divergences(model, engine: Engine, prompts: list[list[int]], steps: int) -> int:
    """How many prompts' greedy tokens on ``engine`` leave transformers generate's; each may only
    after a step where the reference's top-2 logits are within TOP2_TOLERANCE (asserted)."""
    finished = generate_ids(engine, prompts, max_new_tokens=steps)
    near_ties = 0
    for ids, done in zip(prompts, finished, strict=True):
        expected, gaps = reference_greedy(model, ids, steps)
        assert done.reason == "length" and len(done.tokens) == steps
        for step, (ours, theirs) in enumerate(zip(done.tokens, expected, strict=True)):
            if ours != theirs:
                assert gaps[step] < TOP2_TOLERANCE, (ids, step, gaps[step])
                near_ties += 1
                break
    return near_ties


def test_greedy_tokens_equal_the_reference_path(model, engine, record_property):
    """On a fixed prompt set the engine's greedy tokens are transformers generate's, except after
    a step where the reference's top-2 logits are within TOP2_TOLERANCE (counted, reported)."""
    steps, prompts = 24, random_prompts(8)
    near_ties = near_tie_divergences(model, engine, prompts, steps)
    record_property("greedy_divergences", f"{near_ties}/{len(prompts)}")
    print(f"greedy divergences at a near tie: {near_ties} of {len(prompts)} prompts")
    assert near_ties <= len(prompts) // 4


def test_gemma3_greedy_tokens_equal_the_reference_path():
    """Gemma-3's decode (its sliding layers' windows reached after TINY_GEMMA3_WINDOW tokens)
    gives transformers generate's greedy tokens, but at a near tie, in a batch of prompts of
    different lengths."""
    model = quantized(BCQConfig(bits=3, group_size=32, method="offset"), architecture="gemma3")
    steps, prompts = 16, random_prompts(4, seed=7)
    assert max(len(p) for p in prompts) + steps > 3 * TINY_GEMMA3_WINDOW
    near_tie_divergences(model, Engine.build(model), prompts, steps)


def test_batch_of_different_lengths_equals_each_prompt_alone(engine):
    prompts = random_prompts(6, seed=5)
    assert len({len(p) for p in prompts}) > 1
    batched = generate_ids(engine, prompts, max_new_tokens=12)
    alone = [generate_ids(engine, [p], max_new_tokens=12)[0] for p in prompts]
    assert [d.tokens for d in batched] == [d.tokens for d in alone]
    assert len({tuple(d.tokens) for d in batched}) > 1  # not vacuous


def test_request_checks(engine):
    assert generate_ids(engine, [], max_new_tokens=4) == []
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_ids(engine, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ConfigError, match="at least one token"):
        generate_ids(engine, [[1], []], max_new_tokens=2)


def test_eos_ends_a_row(engine):
    prompts = random_prompts(3, seed=7)
    free = generate_ids(engine, prompts, max_new_tokens=10)
    eos = free[0].tokens[3]
    stopped = generate_ids(engine, prompts, max_new_tokens=10, eos_ids=[eos])
    assert stopped[0].reason == "eos"
    assert stopped[0].tokens == free[0].tokens[: free[0].tokens.index(eos)]
    for before, after in zip(free[1:], stopped[1:], strict=True):  # other rows unaffected
        cut = before.tokens.index(eos) if eos in before.tokens else None
        assert after.tokens == before.tokens[:cut]


def test_stop_condition_ends_a_row_keeping_the_token(engine):
    prompts = random_prompts(2, seed=9)
    free = generate_ids(engine, prompts, max_new_tokens=10)
    marker = free[1].tokens[4]
    decode = lambda ids: "".join(f"<{i}>" for i in ids)
    stopped = generate_ids(
        engine, prompts, max_new_tokens=10, decode=decode, stop=lambda text: f"<{marker}>" in text
    )
    cut = free[1].tokens.index(marker) + 1
    assert stopped[1].reason == "stop" and stopped[1].tokens == free[1].tokens[:cut]
    with pytest.raises(ConfigError, match="decode"):
        generate_ids(engine, prompts, max_new_tokens=2, stop=lambda text: False)


def test_sampling_is_reproducible_per_seed_and_per_prompt(engine):
    prompts = random_prompts(4, seed=11)
    sampling = Sampling(do_sample=True, temperature=1.5, seed=3)
    first = generate_ids(engine, prompts, max_new_tokens=16, sampling=sampling)
    again = generate_ids(engine, prompts, max_new_tokens=16, sampling=sampling)
    assert [d.tokens for d in first] == [d.tokens for d in again]
    # A prompt's sample does not depend on its batch: same prompt index, same seed, same tokens.
    alone = generate_ids(engine, prompts[2:3], max_new_tokens=16, sampling=sampling,
                         prompt_indices=[2])  # fmt: skip
    assert alone[0].tokens == first[2].tokens
    other = generate_ids(engine, prompts, max_new_tokens=16, sampling=Sampling(True, 1.5, seed=4))
    assert [d.tokens for d in other] != [d.tokens for d in first]
    greedy = generate_ids(engine, prompts, max_new_tokens=16)
    assert [d.tokens for d in first] != [d.tokens for d in greedy]  # it did sample


@pytest.mark.parametrize(
    "sampling", [Sampling(True, top_k=1, seed=1), Sampling(True, top_p=1e-6, seed=1)],
    ids=["top_k=1", "top_p=1e-6"],
)  # fmt: skip
def test_sampling_cut_to_one_token_is_greedy(engine, sampling):
    prompts = random_prompts(3, seed=13)
    sampled = generate_ids(engine, prompts, max_new_tokens=12, sampling=sampling)
    greedy = generate_ids(engine, prompts, max_new_tokens=12)
    assert [d.tokens for d in sampled] == [d.tokens for d in greedy]


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15]], np.float32))
    kept = lambda s: set(np.flatnonzero(np.isfinite(filter_logits(logits, s))[0]).tolist())
    assert kept(Sampling(True, top_k=2)) == {1, 3}
    assert kept(Sampling(True, top_p=0.7)) == {1, 3}  # 0.4 + 0.3 reaches 0.7
    assert kept(Sampling(True, top_p=0.71)) == {1, 3, 4}
    assert kept(Sampling(True, top_k=2, top_p=0.3)) == {1}
    # Temperature divides the logits before the draw.
    scaled = filter_logits(logits, Sampling(True, temperature=2.0))
    np.testing.assert_allclose(scaled, logits / 2, rtol=1e-6)
    sampling = Sampling(True, top_k=2)
    generators = sampling.generators([0])
    draws = [int(choose_tokens(logits, sampling, generators)[0]) for _ in range(400)]
    assert set(draws) == {1, 3}
    # The draw follows the kept tokens' renormalised probabilities: 0.4 / 0.7 for token 1.
    assert abs(draws.count(1) / len(draws) - 0.4 / 0.7) < 0.08
    with pytest.raises(ConfigError):
        Sampling(True, temperature=0)
    with pytest.raises(ConfigError):
        Sampling(True, top_p=1.5)


def test_unsupported_models_say_why():
    plain = make_tiny_llama(VOCAB)
    with pytest.raises(UnsupportedModelError, match="not BCQLinear"):
        Engine.build(plain)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(UnsupportedModelError, match="Llama family"):
        Engine.build(gpt2)
    model = quantized(BCQConfig(bits=3, group_size=32, method="offset"))
    model.train()
    with pytest.raises(UnsupportedModelError, match="training mode"):
        Engine.build(model)
    # Gemma variants the step does not run: logit soft-capping, bidirectional attention.
    config = BCQConfig(bits=3, group_size=32, method="offset")
    for setting, match in (
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"use_bidirectional_attention": True}, "bidirectional"),
    ):
        with pytest.raises(UnsupportedModelError, match=match):
            Engine.build(quantized(config, architecture="gemma3", **setting))
    # Layer kinds are read, never guessed (transformers' default is a pattern of both).
    gemma = quantized(config, architecture="gemma3")
    gemma.config.layer_types = None
    with pytest.raises(UnsupportedModelError, match="layer types"):
        Engine.build(gemma)


def test_reference_kernel_setting_is_not_served(model, monkeypatch):
    monkeypatch.setenv("ALPHATUNE_KERNEL", "reference")
    with pytest.raises(UnsupportedModelError, match="no LUT kernel"):
        Engine.build(model)


def test_cache_is_sized_to_the_request(engine):
    cache = engine.new_cache(3, 50)
    spec = engine.spec.shape
    assert cache.keys.shape == (spec.n_layers, 3, spec.n_kv_heads, 50, spec.head_dim)
    with pytest.raises(UnsupportedModelError, match="exceed"):
        engine.new_cache(1, spec.max_positions + 1)


def model_with_two_adapters(directory, architecture: str = "llama") -> tuple[torch.nn.Module, dict]:
    """A quantized tiny model (``quantized``'s architecture) and two saved adapters ("a", "b")
    of randomly moved scales; the model keeps its own scales."""
    from alphatune import AlphaTuningConfig
    from alphatune.adapters import save_adapter
    from alphatune.tuning import prepare_for_alphatuning

    model = quantized(BCQConfig(bits=3, group_size=32, method="offset"), architecture=architecture)
    prepare_for_alphatuning(model, AlphaTuningConfig())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    original = {n: p.detach().clone() for n, p in trainable.items()}
    generator = torch.Generator().manual_seed(0)
    paths = {}
    for task in ("a", "b"):
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(original[name] * (1 + 0.5 * torch.randn(p.shape, generator=generator)))
        paths[task] = save_adapter(model, directory / task, AlphaTuningConfig())
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(original[name])
    model.requires_grad_(False).eval()
    return model, paths


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_mixed_batch_rows_use_their_adapters(tmp_path, caplog, architecture):
    from alphatune.adapters import load_adapter, unload_adapter
    from alphatune.mixed import load_adapters, unload_adapters

    model, paths = model_with_two_adapters(tmp_path, architecture)
    prompts = random_prompts(4, seed=17)
    rows = ["a", "b", None, "a"]
    expected = []
    for ids, name in zip(prompts, rows, strict=True):
        if name is None:
            unload_adapter(model)
        else:
            load_adapter(model, paths[name])
        expected.append(generate_ids(Engine.build(model), [ids], max_new_tokens=10)[0].tokens)
    unload_adapter(model)
    bank = load_adapters(model, paths)
    try:
        engine = Engine.build(model, use_bank=True)
        assert engine.weights.banked
        sets = bank.indices(rows).tolist()
        mixed = generate_ids(engine, prompts, max_new_tokens=10, adapter_sets=sets)
    finally:
        unload_adapters(model)
    assert [d.tokens for d in mixed] == expected
    assert (
        expected[0] != generate_ids(Engine.build(model), prompts[:1], max_new_tokens=10)[0].tokens
    )


def test_the_engine_reads_the_layers_scales_in_place(monkeypatch):
    """On a kernel that reads scales in the layers' own order (AVX2), decode holds one copy of
    them: the engine's operands are the layer's α₁, other α and offset, and an edit in place shows
    in the next call, as in the transformers forward."""
    from alphatune import kernels
    from alphatune.kernels import decode_kernel, lut_common
    from alphatune_runtime import native

    if kernels.lut_kernel() is not None:  # float32 tables (1e-4 below), AVX-512 CPUs included
        monkeypatch.setenv(kernels.KERNEL_ENV, "avx2")
    if decode_kernel().module.SCALES_LAYOUT != lut_common.LAYER_ORDER:
        pytest.skip("this CPU's kernel reads scales in its own layout (a copy)")
    model = quantized(BCQConfig(bits=3, group_size=32, method="offset"))
    engine = Engine.build(model)
    for index, layer in enumerate(m for m in model.modules() if isinstance(m, BCQLinear)):
        ints = engine.weights.ints[index]
        assert ints[native.FIRST_ADDRESS] == layer.alpha1.data_ptr()
        assert ints[native.REST_ADDRESS] == layer.alpha_rest.data_ptr()
        assert ints[native.OFFSET_ADDRESS] == layer.offset.data_ptr()
    ids = random_prompts(1)[0]
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.alpha_rest.mul_(1.5)
    torch.testing.assert_close(
        torch.from_numpy(prompt_logits(engine, ids)),
        reference_logits(model, ids),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_threads_give_the_same_tokens(architecture):
    """Two threads split layers and attention (Gemma-3: windowed attention too); the tokens
    stay the same."""
    from numba import config

    if config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba's pool has one thread here (e.g. pinned to one core)")
    model = quantized(BCQConfig(bits=3, group_size=32, method="offset"), architecture=architecture)
    prompts = random_prompts(4, seed=19)
    one = generate_ids(Engine.build(model), prompts, max_new_tokens=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lowered = Engine.build(model)
        lowered.stack.min_parallel_work = 1  # every layer and attention take the parallel paths
        lowered.stack.min_parallel_attention = 1
        two = generate_ids(lowered, prompts, max_new_tokens=8)
    finally:
        torch.set_num_threads(threads)
    assert [d.tokens for d in two] == [d.tokens for d in one]


@pytest.mark.parametrize("threads", [1, 2])
def test_projections_sharing_an_input_equal_each_projection_alone(engine, threads):
    """q, k and v (and gate and up) built from one set of tables, with their row blocks in one
    parallel region, give exactly what each projection gives with tables of its own."""
    import numpy as np
    from numba import config, njit

    from alphatune.kernels.numba_threads import numba_threads
    from alphatune_runtime import native

    if threads > config.NUMBA_NUM_THREADS:
        pytest.skip("numba's pool has one thread here")

    @njit
    def group(tag, x, index, count, codes, biases, ints, sets, threads):
        outputs = [np.empty((x.shape[0], ints[index + p, native.OUT_FEATURES]), np.float32)
                   for p in range(count)]  # fmt: skip
        native._project_group(tag, x, index, count, codes, biases, ints, sets, sets, threads, 0,
                              outputs)  # fmt: skip
        return outputs

    w = engine.weights
    sets = np.zeros(3, np.int64)
    generator = np.random.default_rng(5)
    with numba_threads(threads):
        for first, count in native.SHARED_INPUTS:
            index = len(native.PROJECTIONS) + first  # block 1
            # The tiny model's widths are whole bytes, so the input is exactly this wide.
            width = int(w.ints[index, native.N_BYTES]) * 8
            x = generator.standard_normal((3, width), np.float32)
            args = (engine.stack.kernel_tag, x, index, count, w.codes, w.biases, w.ints, sets)
            outputs = group(*args, threads)
            for p in range(count):
                alone = native._project(*args[:2], index + p, *args[4:], sets, 1, 1 << 62)
                np.testing.assert_array_equal(outputs[p], alone)


def test_projections_sharing_an_input_need_the_same_groups(model):
    """The engine builds one input's tables for q, k and v: a q quantized with other groups is
    refused with the reason (the caller falls back to transformers generate)."""
    import copy

    from alphatune.layers import BCQLinear

    odd = copy.deepcopy(model)
    attention = odd.model.layers[0].self_attn
    dense = torch.nn.Linear(attention.q_proj.in_features, attention.q_proj.out_features)
    attention.q_proj = BCQLinear.from_linear(
        dense, BCQConfig(bits=3, method="greedy"), group_size=16
    ).eval()
    with pytest.raises(
        UnsupportedModelError, match=r"block 0: self_attn.q_proj, .* different groups"
    ):
        Engine.build(odd)


@pytest.mark.parametrize("kernel, bits", [("avx2-int16", 16), ("avx2-int8", 8)])
def test_integer_tables_kernels_run_in_the_engine(monkeypatch, exact_tables, kernel, bits):
    """``ALPHATUNE_KERNEL=avx2-int16`` / ``avx2-int8``: the engine runs the integer-table loop, and
    is as close to the exact logits as the layers' own path on it is (lossy: see avx2_lut)."""
    from alphatune.kernels import avx2_lut

    if not avx2_lut.available():
        pytest.skip("no AVX2 here")
    model = quantized(BCQConfig(bits=3, group_size=32, method="offset"))
    ids = random_prompts(1, seed=21)[0]
    exact = reference_logits(model, ids)
    monkeypatch.setenv("ALPHATUNE_KERNEL", kernel)
    engine = Engine.build(model)
    assert engine.kernel_name == kernel and engine.stack.kernel.table_bits == bits
    model.apply(lambda m: getattr(m, "release_weight_cache", lambda: None)())
    layers = reference_logits(model, ids)

    def rms(t: torch.Tensor) -> float:
        return float(t.pow(2).mean().sqrt())

    ours = torch.from_numpy(prompt_logits(engine, ids))
    assert 0 < rms(ours - exact) < 2 * rms(layers - exact) + 1e-6
    assert rms(ours - exact) < (0.05 if bits == 8 else 1e-3) * rms(exact)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_decode_leaves_numba_s_compiler_paged_out(model):
    """``Engine.build`` loads the step's code, then pages out LLVM (llvmlite's library); decode,
    on one thread or two, never reads it back."""
    from alphatune.memory import page_out_compiler

    engine = Engine.build(model)
    library = mapped_library("libllvmlite.so")
    assert library is not None and page_out_compiler() > 0
    after_build = resident_kib(library)
    prompts = random_prompts(3, seed=23)
    generate_ids(engine, prompts, max_new_tokens=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generate_ids(engine, prompts, max_new_tokens=8)
    finally:
        torch.set_num_threads(threads)
    assert resident_kib(library) <= after_build + 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_an_engine_from_a_loaded_base_pages_out_the_stored_codes(tmp_path, exact_tables):
    """Built from a saved base, the engine holds the only resident copy of the codes: the
    layers' stored codes (views of the mapped file) are paged out, and the transformers path
    reads them back from the file with the same results."""
    from alphatune import load_quantized, save_quantized

    # Wide enough that each layer's codes span whole pages (4 KiB).
    config = BCQConfig(bits=3, group_size=32, method="offset")
    source = quantized(config, hidden_size=256, intermediate_size=1024)
    save_quantized(source, tmp_path / "base", config)
    written_back(*(p for p in (tmp_path / "base").iterdir() if p.is_file()))
    model, _ = load_quantized(tmp_path / "base")
    prompt = random_prompts(1)[0]
    before = reference_logits(model, prompt)  # reads every layer's stored codes
    mapped = str((tmp_path / "base" / "model.safetensors").resolve())
    resident = resident_kib(mapped)
    engine = Engine.build(model)
    layers = [m for m in model.modules() if isinstance(m, BCQLinear)]
    codes_kib = sum(layer.packed_codes.numel() for layer in layers) // 1024
    assert resident_kib(mapped) <= resident - codes_kib // 2
    torch.testing.assert_close(reference_logits(model, prompt), before, rtol=0, atol=0)
    after = torch.from_numpy(prompt_logits(engine, prompt))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
