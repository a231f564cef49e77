"""Whole-file integrity: any flipped byte in a saved base, adapter or training checkpoint is either
a clear ``CheckpointError`` naming the file, or harmless (the load is identical), never a silent
difference. Also: files written before content hashes were recorded still load."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_models import make_tiny_llama

from alphatune import (
    AlphaTuningConfig,
    BCQConfig,
    CheckpointError,
    TrainConfig,
    prepare_for_alphatuning,
    quantize_,
)
from alphatune.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_WEIGHTS,
    load_adapter,
    load_quantized,
    read_adapter,
    save_adapter,
    save_quantized,
)
from alphatune.data import Example
from alphatune.files import CHECKPOINT_STATE, CHECKPOINT_TENSORS, seal, tensor_digest
from alphatune.train import CHECKPOINT_DIR, train

CONFIG = BCQConfig(bits=3, group_size=32, method="offset")
FLIPS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # a fixed set of flips: the same test on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file: a tensor loaded from the old one maps its pages (safetensors
    loads by mmap), so writing in place would change the references the test compares with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def restore(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        write_new(directory / name, data)


@st.composite
def flips(draw, files: dict[str, bytes]):
    """One byte of one of ``files``, XORed with a non-zero mask."""
    name = draw(st.sampled_from(sorted(files)))
    size = len(files[name])
    # Hypothesis favours small and boundary integers (the headers); a uniform position reaches
    # the tensor data, most of each file.
    uniform = st.randoms(use_true_random=False).map(lambda r: r.randrange(size))
    offset = draw(st.one_of(st.integers(0, size - 1), uniform))
    return name, offset, draw(st.integers(1, 255))


def flip(directory: Path, files: dict[str, bytes], name: str, offset: int, mask: int) -> None:
    data = bytearray(files[name])
    data[offset] ^= mask
    write_new(directory / name, bytes(data))


def cloned(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in state.items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


# ---------------------------------------------------------------- bases
@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    model = make_tiny_llama(128)
    quantize_(model, CONFIG)
    path = tmp_path_factory.mktemp("integrity") / "base"
    save_quantized(model, path, CONFIG)
    loaded, _ = load_quantized(path)
    return path, cloned(loaded.state_dict()), loaded.config.to_dict()


def test_every_tensor_of_a_base_is_hashed(saved_base):
    path, _, _ = saved_base
    record = json.loads((path / "config.json").read_text())["quantization_config"]["integrity"]
    stored = load_file(path / BASE_WEIGHTS)
    assert record["tensors"] == {name: tensor_digest(t) for name, t in stored.items()}
    assert any(name.endswith("alpha_rest") for name in record["tensors"])  # fp16 scales
    assert "model.embed_tokens.alpha" in record["tensors"]  # the compact embedding's scales


@pytest.mark.parametrize(
    "tensor", ["model.layers.0.self_attn.q_proj.alpha_rest", "model.embed_tokens.alpha"]
)
def test_a_flipped_scale_or_embedding_byte_is_named(saved_base, tensor):
    from safetensors import safe_open

    path, _, _ = saved_base
    original = files_of(path)
    data = bytearray(original[BASE_WEIGHTS])
    with safe_open(path / BASE_WEIGHTS, "pt") as f:
        first = f.get_slice(tensor)[0].reshape(-1)[:1]  # the tensor's first element
    # Find the tensor's bytes in the file: after the header, at the offset the header gives.
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    start = 8 + header_length + header[tensor]["data_offsets"][0]
    assert (
        bytes(data[start : start + first.element_size()])
        == first.view(torch.uint8).numpy().tobytes()
    )
    data[start + first.element_size() - 1] ^= 0x40  # an exponent bit: the value explodes
    write_new(path / BASE_WEIGHTS, bytes(data))
    try:
        with pytest.raises(CheckpointError, match=rf"{BASE_WEIGHTS}: tensor '{tensor}' does not"):
            load_quantized(path)
    finally:
        restore(path, original)


@FLIPS
@given(data=st.data())
def test_a_flipped_byte_in_a_base_is_an_error_or_harmless(saved_base, data):
    path, state, config = saved_base
    original = files_of(path)
    name, offset, mask = data.draw(flips(original))
    flip(path, original, name, offset, mask)
    try:
        loaded, _ = load_quantized(path)
    except CheckpointError as err:
        assert str(path) in str(err)  # names the directory or its file
    else:
        assert same_state(loaded.state_dict(), state) and loaded.config.to_dict() == config
    finally:
        restore(path, original)


def test_a_base_without_hashes_loads_with_a_warning(saved_base, tmp_path, caplog):
    path, state, _ = saved_base
    old = tmp_path / "old"
    restore(old, files_of(path))
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]["integrity"]
    write_new(old / "config.json", json.dumps(config).encode())
    with caplog.at_level(logging.WARNING, logger="alphatune"):
        loaded, _ = load_quantized(old)
    assert same_state(loaded.state_dict(), state)
    assert "without content hashes" in caplog.text


# ---------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def saved_adapter(saved_base, tmp_path_factory):
    path, _, _ = saved_base
    model, _ = load_quantized(path)
    prepare_for_alphatuning(model, AlphaTuningConfig())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.25)
    adapter = tmp_path_factory.mktemp("integrity") / "adapter"
    save_adapter(model, adapter, AlphaTuningConfig(), metadata={"task": "x"})
    base, _ = load_quantized(path)
    config, tensors = read_adapter(base, adapter)
    return base, adapter, config, cloned(tensors)


@FLIPS
@given(data=st.data())
def test_a_flipped_byte_in_an_adapter_is_an_error_or_harmless(saved_adapter, data):
    base, adapter, config, tensors = saved_adapter
    original = files_of(adapter)
    name, offset, mask = data.draw(flips(original))
    flip(adapter, original, name, offset, mask)
    try:
        found_config, found = read_adapter(base, adapter)
    except CheckpointError as err:
        assert str(adapter) in str(err)
    else:
        assert same_state(found, tensors) and found_config == config
    finally:
        restore(adapter, original)


def test_an_adapter_without_hashes_loads_with_a_warning(saved_adapter, tmp_path, caplog):
    base, adapter, _, tensors = saved_adapter
    old = tmp_path / "old"
    restore(old, files_of(adapter))
    config = json.loads((old / ADAPTER_CONFIG).read_text())
    for key in ("integrity", "format"):  # what adapters written before both existed hold
        del config[key]
    write_new(old / ADAPTER_CONFIG, json.dumps(config).encode())
    with caplog.at_level(logging.WARNING, logger="alphatune"):
        load_adapter(base, old)
    assert "without content hashes" in caplog.text
    try:
        for name, value in tensors.items():
            assert torch.equal(base.get_parameter(name), value)
    finally:
        from alphatune.adapters import unload_adapter

        unload_adapter(base)


def test_an_adapter_hashed_with_blake2b_still_verifies(saved_adapter, tmp_path):
    base, adapter, _, tensors = saved_adapter
    restore(tmp_path / "b2", files_of(adapter))
    document = json.loads((adapter / ADAPTER_CONFIG).read_text())
    del document["integrity"]
    document = seal(document, ("integrity",), tensors, algorithm="blake2b-128")
    write_new(tmp_path / "b2" / ADAPTER_CONFIG, json.dumps(document).encode())
    _, found = read_adapter(base, tmp_path / "b2")
    assert same_state(found, tensors)
    document["integrity"]["algorithm"] = "md5"
    write_new(tmp_path / "b2" / ADAPTER_CONFIG, json.dumps(document).encode())
    with pytest.raises(CheckpointError, match="names hash 'md5'"):
        read_adapter(base, tmp_path / "b2")


def test_a_nan_adapter_is_neither_saved_nor_loaded(saved_adapter, tmp_path):
    from safetensors.torch import save_file
    from sealing import reseal_adapter

    base, adapter, _, tensors = saved_adapter
    model = copy.deepcopy(base)
    prepare_for_alphatuning(model, AlphaTuningConfig())
    name = min(tensors)
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=rf"refusing to save .*{name}.* NaN or infinity"):
        save_adapter(model, tmp_path / "nan", AlphaTuningConfig())
    assert not (tmp_path / "nan").exists()
    # One written by hand (or by an older alphatune) is refused on load.
    restore(tmp_path / "inf", files_of(adapter))
    poisoned = dict(tensors)
    poisoned[name] = tensors[name].clone()
    poisoned[name][0, 0] = float("inf")
    save_file(poisoned, tmp_path / "inf" / ADAPTER_WEIGHTS)
    reseal_adapter(tmp_path / "inf")
    with pytest.raises(CheckpointError, match=rf"{ADAPTER_WEIGHTS}: {name} hold NaN or infinity"):
        read_adapter(base, tmp_path / "inf")


# ---------------------------------------------------------------- checkpoints
EXAMPLES = [Example(prompt=f"Table: name[{n}]\nText:", target=f" {n} is a pub.") for n in "ABCD"]
TRAIN = TrainConfig(max_steps=2, batch_size=2, checkpoint_every=1, learning_rate=1e-2)


@pytest.fixture(scope="module")
def checkpoint_run(tokenizer, tmp_path_factory):
    model = make_tiny_llama(len(tokenizer))
    quantize_(model, CONFIG)
    prepare_for_alphatuning(model, AlphaTuningConfig())
    fresh = copy.deepcopy(model)
    output = tmp_path_factory.mktemp("integrity") / "run"
    train(model, tokenizer, EXAMPLES, TRAIN, output_dir=output, progress=False, fingerprint="f")
    return fresh, output / CHECKPOINT_DIR


def resume(fresh, tokenizer, checkpoint: Path):
    """Resume a finished run: reads the checkpoint, trains no step, writes it again."""
    model = copy.deepcopy(fresh)
    train(
        model,
        tokenizer,
        EXAMPLES,
        TRAIN,
        output_dir=checkpoint.parent,
        resume=True,
        progress=False,
        fingerprint="f",
    )


@settings(FLIPS, max_examples=20)
@given(data=st.data())
def test_a_flipped_byte_in_a_checkpoint_is_an_error_or_harmless(checkpoint_run, tokenizer, data):
    fresh, checkpoint = checkpoint_run
    original = files_of(checkpoint)
    name, offset, mask = data.draw(flips(original))
    flip(checkpoint, original, name, offset, mask)
    try:
        resume(fresh, tokenizer, checkpoint)
    except CheckpointError as err:
        assert str(checkpoint) in str(err)
    else:
        # What the resumed run read is what it wrote back: the same tensors and state.
        assert same_state(
            load_file(checkpoint / CHECKPOINT_TENSORS),
            load_file_bytes(original[CHECKPOINT_TENSORS]),
        )
        written = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
        assert written == json.loads(original[CHECKPOINT_STATE])
    finally:
        restore(checkpoint, original)


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_a_checkpoint_without_hashes_resumes(checkpoint_run, tokenizer, caplog):
    fresh, checkpoint = checkpoint_run
    original = files_of(checkpoint)
    state = json.loads(original[CHECKPOINT_STATE])
    for key in ("integrity", "format"):
        del state[key]
    write_new(checkpoint / CHECKPOINT_STATE, json.dumps(state).encode())
    try:
        with caplog.at_level(logging.WARNING, logger="alphatune"):
            resume(fresh, tokenizer, checkpoint)
        assert "without content hashes" in caplog.text
        assert same_state(
            load_file(checkpoint / CHECKPOINT_TENSORS),
            load_file_bytes(original[CHECKPOINT_TENSORS]),
        )
    finally:
        restore(checkpoint, original)
