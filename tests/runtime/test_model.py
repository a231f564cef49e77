"""The torch-free runtime (``alphatune_runtime.model.Model``) against the engine on the same base.

A base saved by ``save_quantized`` is read back by the runtime straight from its files: its
logits must equal the engine's (``alphatune.engine``, the same numba step on the layers
``load_quantized`` builds), its tokens too, and a process that only decodes must never import
torch or transformers. Bad files are refused with the file and tensor named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_gemma3, make_tiny_llama

from alphatune import BCQConfig, load_quantized, quantize_, save_quantized
from alphatune.engine import Engine, generate_ids, prompt_logits
from alphatune.errors import CheckpointError, ConfigError, UnsupportedModelError
from alphatune.kernels import lut_kernel
from alphatune_runtime.model import Model
from alphatune_runtime.sampling import Sampling

pytestmark = [
    pytest.mark.numba,
    pytest.mark.skipif(lut_kernel() is None, reason="no LUT kernel on this CPU"),
]

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def _save(directory, config: BCQConfig, seed: int = 0, architecture: str = "llama"):
    make = make_tiny_gemma3 if architecture == "gemma3" else make_tiny_llama
    model = make(VOCAB, seed=seed)
    quantize_(model, config)
    save_quantized(model.eval(), directory, config)
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 3-bit base with the defaults: compact embedding, compact head tied to it."""
    directory = tmp_path_factory.mktemp("runtime") / "base"
    return _save(directory, BCQConfig(bits=3, group_size=32, method="offset"))


def _prompts(count: int, seed: int = 1) -> list[list[int]]:
    generator = np.random.default_rng(seed)
    return [generator.integers(0, VOCAB, int(n)).tolist() for n in generator.integers(1, 40, count)]


@pytest.mark.parametrize(
    "config, architecture",
    [
        # compact embedding and tied compact head (the defaults)
        (BCQConfig(bits=3, group_size=32, method="offset"), "llama"),
        (BCQConfig(bits=2, group_size=64, method="greedy", embedding="keep", lm_head="keep"),
         "llama"),
        (BCQConfig(bits=4, method="offset", lm_head="compact", embedding="keep"), "llama"),
        (BCQConfig(bits=3, group_size=32, method="offset", layer_bits={"*.down_proj": 4}),
         "llama"),
        # Gemma-3's form (tests/tiny_models.make_tiny_gemma3: windows, two ropes, its norms),
        # and its float embedding, stored without the sqrt(hidden) its forward applies
        (BCQConfig(bits=3, group_size=32, method="offset"), "gemma3"),
        (BCQConfig(bits=3, group_size=32, method="offset", embedding="keep", lm_head="keep"),
         "gemma3"),
    ],
    ids=["compact", "float-tables", "own-head-table", "mixed-bits", "gemma3", "gemma3-float"],
)  # fmt: skip
def test_the_runtime_gives_the_engines_logits_and_tokens(tmp_path, config, architecture):
    directory = _save(tmp_path / "base", config, architecture=architecture)
    model, _ = load_quantized(directory)
    engine = Engine.build(model)
    runtime = Model.load(directory, threads=1)
    prompts = _prompts(4)
    for prompt in prompts[:2]:
        np.testing.assert_allclose(
            prompt_logits(runtime, prompt), prompt_logits(engine, prompt), rtol=1e-5, atol=1e-5
        )
    ours = generate_ids(runtime, prompts, max_new_tokens=12)
    theirs = generate_ids(engine, prompts, max_new_tokens=12)
    assert [d.tokens for d in ours] == [d.tokens for d in theirs]


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_long_prompts_prefill_through_float32_gemms(tmp_path, monkeypatch, architecture):
    """Without torch the dense prefill runs float32 GEMMs through numpy and the numba step's
    attention: the tokens of the LUT path, and the engine's (Gemma-3: prompts past its sliding
    window); ``auto`` takes it from ``MIN_NUMPY_TOKENS`` tokens."""
    from alphatune_runtime import dense_prefill

    config = BCQConfig(bits=3, group_size=32, method="offset")
    directory = _save(tmp_path / "base", config, architecture=architecture)
    runtime = Model.load(directory, threads=1)
    generator = np.random.default_rng(3)
    prompts = [generator.integers(0, VOCAB, n).tolist() for n in (70, 5, 90)]
    monkeypatch.setenv(dense_prefill.PREFILL_ENV, "lut")
    expected = [d.tokens for d in generate_ids(runtime, prompts, max_new_tokens=10)]
    passes = []
    run = dense_prefill.DensePrefill.run
    monkeypatch.setattr(
        dense_prefill.DensePrefill,
        "run",
        lambda self, *a, **k: passes.append(a[1]) or run(self, *a, **k),
    )
    monkeypatch.setenv(dense_prefill.PREFILL_ENV, "float32")
    assert [d.tokens for d in generate_ids(runtime, prompts, max_new_tokens=10)] == expected
    assert [[p.length for p in part] for part in passes] == [[70, 5, 90]]
    model, _ = load_quantized(directory)
    engine = Engine.build(model)
    assert [d.tokens for d in generate_ids(engine, prompts, max_new_tokens=10)] == expected
    assert len(passes) == 2  # the engine's dense prefill runs the same loop (on torch)
    monkeypatch.setenv(dense_prefill.PREFILL_ENV, "auto")
    monkeypatch.setattr(dense_prefill, "MIN_NUMPY_TOKENS", 100)  # the tiny model's 256 positions
    generate_ids(runtime, [prompts[0]], max_new_tokens=1)  # 70 tokens: the LUT kernel
    assert len(passes) == 2
    long = generator.integers(0, VOCAB, 100).tolist()
    generate_ids(runtime, [long], max_new_tokens=1)
    assert len(passes) == 3


def test_numpy_gemms_run_on_the_threads_asked_for():
    """numpy's OpenBLAS uses every core by default; a prefill on one thread holds it to one."""
    from alphatune_runtime import dense_prefill

    _, getter = dense_prefill._openblas_thread_calls()
    if getter is None:
        pytest.skip("numpy's BLAS exposes no thread setting here")
    before = getter()
    with dense_prefill.NumpyOps().threads(1):
        assert getter() == 1
    assert getter() == before


def test_sampling_is_seeded_per_prompt(base):
    runtime = Model.load(base, threads=1)
    prompts = _prompts(3, seed=5)
    sampling = Sampling(do_sample=True, temperature=1.5, seed=7)
    first = generate_ids(runtime, prompts, max_new_tokens=10, sampling=sampling)
    again = generate_ids(runtime, prompts, max_new_tokens=10, sampling=sampling)
    assert [d.tokens for d in first] == [d.tokens for d in again]
    alone = generate_ids(runtime, prompts[1:2], max_new_tokens=10, sampling=sampling,
                         prompt_indices=[1])  # fmt: skip
    assert alone[0].tokens == first[1].tokens
    greedy = generate_ids(runtime, prompts, max_new_tokens=10)
    assert [d.tokens for d in first] != [d.tokens for d in greedy]  # it did sample
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        Sampling(do_sample=True, seed=-1)


def test_decoding_never_imports_torch_or_transformers(base):
    """A fresh process: load the base, generate, and check what was imported."""
    script = textwrap.dedent(
        f"""
        import sys
        from alphatune_runtime.model import Model
        model = Model.load({str(base)!r}, threads=1)
        out = model.generate([[1, 2, 3]], max_new_tokens=4) if model.tokenizer else None
        from alphatune_runtime.generate import generate_ids
        done = generate_ids(model, [[1, 2, 3]], max_new_tokens=4)
        assert len(done[0].tokens) <= 4
        # A long prompt prefills through float32 GEMMs (numpy), still without torch.
        from alphatune_runtime import dense_prefill
        run, passes = dense_prefill.DensePrefill.run, []
        dense_prefill.DensePrefill.run = lambda *a, **k: passes.append(1) or run(*a, **k)
        done = generate_ids(model, [[1, 2, 3] * 50], max_new_tokens=2)
        assert len(done[0].tokens) <= 2 and passes == [1], passes
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
        """
    )
    # (The suite's fixture asks for the LUT prefill; this process takes the dense one.)
    env = {**os.environ, "ALPHATUNE_PREFILL": "float32"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
        check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("name", "at"),
    [
        ("model.layers.0.mlp.down_proj.alpha1", 0),
        # Read plane by plane: a flip in the last plane is caught after the last slice.
        ("model.embed_tokens.packed_codes", -1),
    ],
)
def test_a_flipped_byte_in_a_scale_or_a_table_names_the_tensor(tmp_path, base, name, at):
    import shutil

    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    assert name in tensors, sorted(tensors)
    flipped = tensors[name].copy()
    flipped.reshape(-1).view(np.uint8)[at] ^= 1
    tensors[name] = flipped
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Model.load(copy)


def test_a_truncated_weights_file_is_refused(tmp_path, base):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        Model.load(copy)
    weights.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        Model.load(copy)


def test_an_edited_config_is_refused(tmp_path, base):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        Model.load(copy)


def test_a_gemma3_config_without_rope_parameters_per_layer_kind_is_refused(tmp_path):
    """transformers 4.x saved Gemma-3's rope as rope_theta / rope_local_base_freq: read as one
    rope, the sliding layers would get the global base frequency; refused, naming the file."""
    from alphatune_runtime.model import _shape

    config = make_tiny_gemma3(VOCAB).config.to_dict()
    _shape(config, tmp_path / "config.json")  # transformers 5's form is served
    old = {k: v for k, v in config.items() if k != "rope_parameters"}
    old |= {"rope_theta": 1e6, "rope_local_base_freq": 10_000.0}
    with pytest.raises(UnsupportedModelError, match=r"config\.json: no rope_parameters"):
        _shape(old, tmp_path / "config.json")


def test_not_a_base_and_unserved_bases_say_why(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Model.load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no alphatune quantization_config"):
        Model.load(tmp_path / "plain")
    config = BCQConfig(bits=3, group_size=32, method="offset", lm_head="bf16")
    bf16 = _save(tmp_path / "bf16", config)
    with pytest.raises(UnsupportedModelError, match="bf16"):
        Model.load(bf16)


def test_bad_requests_are_clear_errors(base):
    runtime = Model.load(base, threads=1)
    with pytest.raises(ConfigError, match="without a tokenizer"):
        runtime.generate(["hello"])
    with pytest.raises(ConfigError, match="out of range"):
        prompt_logits(runtime, [VOCAB + 5])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_ids(runtime, [[1, 2]], max_new_tokens=0)


@pytest.fixture(scope="module")
def text_base(tmp_path_factory, tokenizer):
    """A tiny model of SmolLM2's vocabulary saved with SmolLM2's tokenizer files."""
    model = make_tiny_llama(len(tokenizer), seed=3)
    config = BCQConfig(bits=3, group_size=32, method="offset")
    quantize_(model, config)
    directory = tmp_path_factory.mktemp("runtime-text") / "base"
    save_quantized(model.eval(), directory, config, tokenizer)
    return directory


def test_a_base_with_a_tokenizer_generates_text(text_base):
    """The runtime encodes, stops and decodes as the transformers tokenizer does."""
    runtime = Model.load(text_base, threads=1)
    torch_model, torch_tokenizer = load_quantized(text_base)
    for text in ("name[The Eagle], food[French]", "The capital of France is"):
        assert runtime.tokenizer.encode(text) == torch_tokenizer.encode(text)
    assert torch_tokenizer.eos_token_id in runtime.eos_ids
    prompt = "The capital of France is"
    expected = generate_ids(
        Engine.build(torch_model), [torch_tokenizer.encode(prompt)], max_new_tokens=8,
        eos_ids=runtime.eos_ids,
    )[0].tokens  # fmt: skip
    [text] = runtime.generate([prompt], max_new_tokens=8)
    assert text == torch_tokenizer.decode(expected, skip_special_tokens=True)
    stop = text[len(text) // 2 :][:3]
    if stop.strip():
        [cut] = runtime.generate([prompt], max_new_tokens=8, stop=[stop])
        assert stop not in cut and text.startswith(cut)


def test_the_tokenizer_is_read_and_its_garbage_given_back_before_the_weights(
    text_base, monkeypatch
):
    """Gemma-3's tokenizer.json takes ~290 MiB to parse and keeps ~100: parsed after the
    weights, that would sit on top of them at the load's peak."""
    import alphatune_runtime.model as runtime_model

    events: list[str] = []

    def logged(name, function):
        def wrapper(*args, **kwargs):
            events.append(name)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(runtime_model, "Tokenizer", logged("tokenizer", runtime_model.Tokenizer))
    monkeypatch.setattr(runtime_model, "_Tensors", logged("weights", runtime_model._Tensors))
    monkeypatch.setattr(
        runtime_model, "release_free_memory", logged("trim", runtime_model.release_free_memory)
    )
    Model.load(text_base, threads=1)
    assert events[:3] == ["tokenizer", "trim", "weights"], events


def test_the_command_line_generates_and_reports_bad_input(text_base, tmp_path, capsys):
    from alphatune_runtime.__main__ import main

    assert (
        main([str(text_base), "--prompt", "Hello", "--max-new-tokens", "4", "--threads", "1"]) == 0
    )
    assert capsys.readouterr().out.startswith("Hello\n→ ")
    assert main([str(tmp_path), "--prompt", "Hello"]) == 2
    assert "not a quantized base" in capsys.readouterr().err


def _tuned(base, directory, tuning, seed: int = 0):
    """An adapter of ``base``: its trainable scales moved off the base's values, saved."""
    from alphatune import prepare_for_alphatuning, save_adapter

    model, _ = load_quantized(base)
    prepare_for_alphatuning(model, tuning)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            noise = torch.rand(parameter.shape, generator=generator)
            parameter.mul_(0.7 + 0.6 * noise)  # ±30%, enough to change the tokens
    save_adapter(model, directory, tuning)
    return directory


@pytest.mark.parametrize(
    "tuning",
    [
        {},  # α₁, the paper's default
        {"train": "all_alpha", "train_offset": True},
        {"granularity": "row"},  # a multiplier per output row on the frozen α₁
    ],
    ids=["alpha1", "all-alpha-offset", "row-multiplier"],
)
def test_an_adapter_gives_what_load_adapter_gives(tmp_path, base, tuning):
    from alphatune import AlphaTuningConfig, load_adapter

    adapter = _tuned(base, tmp_path / "adapter", AlphaTuningConfig(**tuning))
    model, _ = load_quantized(base)
    load_adapter(model, adapter)
    engine = Engine.build(model.eval())
    runtime = Model.load(base, adapter=adapter, threads=1)
    plain = Model.load(base, threads=1)
    prompts = _prompts(3, seed=9)
    np.testing.assert_allclose(
        prompt_logits(runtime, prompts[0]), prompt_logits(engine, prompts[0]), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(prompt_logits(plain, prompts[0]), prompt_logits(runtime, prompts[0]))
    ours = generate_ids(runtime, prompts, max_new_tokens=10)
    theirs = generate_ids(engine, prompts, max_new_tokens=10)
    assert [d.tokens for d in ours] == [d.tokens for d in theirs]


def test_an_adapter_of_another_base_or_a_damaged_one_is_refused(tmp_path, base):
    import shutil

    from alphatune import AlphaTuningConfig

    other = _save(tmp_path / "other", BCQConfig(bits=3, group_size=32, method="offset"), seed=5)
    adapter = _tuned(other, tmp_path / "adapter", AlphaTuningConfig())
    with pytest.raises(CheckpointError, match="tuned on base"):
        Model.load(base, adapter=adapter)
    with pytest.raises(CheckpointError, match="not an alphatune adapter"):
        Model.load(base, adapter=base)
    good = _tuned(base, tmp_path / "good", AlphaTuningConfig())
    damaged = tmp_path / "damaged"
    shutil.copytree(good, damaged)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(damaged / "adapter.safetensors"))
    name = min(tensors)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(damaged / "adapter.safetensors"))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        Model.load(base, adapter=damaged)


def test_an_adapter_tensor_with_no_place_or_a_wrong_shape_is_refused(tmp_path, base):
    """Forged adapters, resealed so that the check under test is reached (not the hash check)."""
    import shutil

    from safetensors.numpy import load_file, save_file
    from sealing import reseal_adapter

    from alphatune import AlphaTuningConfig

    good = _tuned(base, tmp_path / "good", AlphaTuningConfig())
    name = "model.layers.0.self_attn.q_proj"
    for forged, match in (
        ({f"{name}.bias": np.zeros(64, np.float32)}, "no place"),  # the layer has no bias
        ({f"{name}.alpha1": np.ones((1, 2), np.float32)}, "has shape"),
    ):
        directory = tmp_path / f"forged-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, directory)
        tensors = load_file(str(directory / "adapter.safetensors")) | forged
        save_file(tensors, str(directory / "adapter.safetensors"))
        reseal_adapter(directory)
        with pytest.raises(CheckpointError, match=match):
            Model.load(base, adapter=directory)
