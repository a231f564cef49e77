"""Shared fixtures: tiny models built from configs (no downloads) and the cached real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests on one torch thread, restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _lut_prefill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill through the LUT kernel unless a test asks for the dense path: the default
    (``auto``) takes bf16 or float32 GEMMs by CPU and prompt length, and the suite should test
    the same path on every CPU. ``tests/engine/test_prefill.py`` and ``tests/runtime`` test the
    dense paths and ``auto``."""
    monkeypatch.setenv("ALPHATUNE_PREFILL", "lut")


@pytest.fixture
def exact_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode on float tables where the default (the AVX2 kernel's int16 tables) would run: the
    AVX-512 kernel's on CPUs with AVX-512F (so the suite keeps exercising that kernel there,
    now that it is not the default), else the AVX2 kernel's float32 tables.

    For tests that compare a LUT path with a float32 reference at float32 tolerance; the int16
    tables' own precision (~1e-4 relative) is tested in ``tests/kernels/test_avx2_lut.py`` and
    ``tests/engine/test_engine.py``.
    """
    from alphatune import kernels
    from alphatune.kernels import avx512_lut

    if kernels.lut_kernel() == kernels.AVX2_DEFAULT:
        monkeypatch.setenv(kernels.KERNEL_ENV, "avx512" if avx512_lut.available() else "avx2")


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from alphatune.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with the real tokenizer's vocabulary, saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_base():
    """A seeded 2-block Llama (vocabulary 128, untied defaults) in eval mode, one per module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()
