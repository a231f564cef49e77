"""The dense prefill's numba kernels (``alphatune_runtime.prefill_kernels``) against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alphatune_runtime import prefill_kernels

pytestmark = [
    pytest.mark.numba,
    pytest.mark.skipif(not prefill_kernels.available(), reason="numba is not installed"),
]

EPS = np.float32(1e-6)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


def from_bits(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(EPS)))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half rotary of x (..., T, d) with tables (T, d)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_into_writes_torchs_norm_in_the_gemms_dtype(dtype):
    x, weight = random(37, 48), random(48, seed=1)
    out = torch.empty(37, 48, dtype=dtype)
    prefill_kernels.rms_norm_into(
        x.numpy(), weight.numpy(), EPS, bits(out) if dtype == torch.bfloat16 else out.numpy()
    )
    expected = rms_norm(x, weight).to(dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    else:  # the same float32 value up to summation order, then one rounding: at most one ulp
        assert (out.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sandwich", [False, True], ids=["llama", "sandwich"])
def test_add_update_adds_the_update_or_its_norm(dtype, sandwich):
    x, update, weight = random(21, 40), random(21, 40, seed=2).to(dtype), random(40, seed=3)
    expected = x + (rms_norm(update, weight) if sandwich else update.float())
    update_array = bits(update) if dtype == torch.bfloat16 else update.numpy()
    prefill_kernels.add_update(x.numpy(), update_array, sandwich, weight.numpy(), EPS)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qk-norm"])
def test_heads_into_cache_splits_norms_and_rotates_one_prompt_of_a_batch(dtype, qk_norm):
    """The second of three prompts (tokens 5..12 of 15): queries at their batch index, keys
    and values at positions 0..7 of the cache row, nothing else written."""
    heads, kv_heads, d, tokens, max_len = 4, 2, 16, 15, 10
    begin, end = 5, 13
    qkv = random(tokens, (heads + 2 * kv_heads) * d).to(dtype)
    q_norm, k_norm = random(d, seed=4), random(d, seed=5)
    angles = torch.arange(max_len)[:, None] * torch.linspace(0.1, 1.0, d)[None]
    cos, sin = torch.cos(angles), torch.sin(angles)
    queries = torch.full((heads, tokens, d), 7.0)
    keys, values = torch.full((kv_heads, max_len, d), 7.0), torch.full((kv_heads, max_len, d), 7.0)
    prefill_kernels.heads_into_cache(
        bits(qkv) if dtype == torch.bfloat16 else qkv.numpy(), begin, end, heads, kv_heads,
        q_norm.numpy(), k_norm.numpy(), qk_norm, EPS, cos.numpy(), sin.numpy(), queries.numpy(),
        keys.numpy(), values.numpy(),
    )  # fmt: skip

    q, k, v = qkv[begin:end].float().split([heads * d, kv_heads * d, kv_heads * d], 1)
    q, k = q.reshape(-1, heads, d).transpose(0, 1), k.reshape(-1, kv_heads, d).transpose(0, 1)
    if qk_norm:
        q, k = rms_norm(q, q_norm), rms_norm(k, k_norm)
    length = end - begin
    q, k = rotate(q, cos[:length], sin[:length]), rotate(k, cos[:length], sin[:length])
    torch.testing.assert_close(queries[:, begin:end], q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys[:, :length], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values[:, :length], v.reshape(-1, kv_heads, d).transpose(0, 1))
    assert (queries[:, :begin] == 7).all() and (queries[:, end:] == 7).all()
    assert (keys[:, length:] == 7).all() and (values[:, length:] == 7).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("window", [0, 50], ids=["causal", "sliding-window"])
def test_numpy_attention_is_torchs_over_tiles_heads_and_windows(threads, window, monkeypatch):
    """``NumpyOps.attention`` (GEMMs over tiles of queries, grouped key/value heads) against
    torch's attention with the same mask, for a prompt of several tiles in cache row 1."""
    from alphatune_runtime import dense_prefill
    from alphatune_runtime.cache import KVCache

    monkeypatch.setattr(dense_prefill, "ATTENTION_TILE", 32)
    heads, kv_heads, d, length, max_len = 6, 2, 16, 90, 100
    queries = random(length, heads, d, seed=6)
    cache = KVCache(
        np.zeros((2, 2, kv_heads, max_len, d), np.float32),
        np.zeros((2, 2, kv_heads, max_len, d), np.float32),
        np.zeros(2, np.int64),
    )
    cache.keys[1, 1, :, :length] = random(kv_heads, length, d, seed=7).numpy()
    cache.values[1, 1, :, :length] = random(kv_heads, length, d, seed=8).numpy()
    ops = dense_prefill.NumpyOps()
    out = np.full((length, heads * d), 7.0, np.float32)
    with ops.threads(threads):
        ops.attention(cache, 1, 1, queries.numpy(), window, 0.25, out)
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = (key <= query) & ((key > query - window) if window else True)
    k = torch.from_numpy(cache.keys[1, 1, :, :length]).repeat_interleave(heads // kv_heads, 0)
    v = torch.from_numpy(cache.values[1, 1, :, :length]).repeat_interleave(heads // kv_heads, 0)
    expected = torch.nn.functional.scaled_dot_product_attention(
        queries.transpose(0, 1), k, v, attn_mask=allowed, scale=0.25
    )
    torch.testing.assert_close(
        torch.from_numpy(out), expected.transpose(0, 1).reshape(length, -1), rtol=1e-5, atol=1e-5
    )


def test_numpy_matmul_splits_its_rows_over_threads():
    from alphatune_runtime import dense_prefill

    x, weight, bias = random(37, 24).numpy(), random(40, 24, seed=1).numpy(), random(40).numpy()
    ops, out = dense_prefill.NumpyOps(), np.zeros((37, 40), np.float32)
    with ops.threads(2):
        ops.matmul(x, weight, bias, out)
    np.testing.assert_allclose(out, x @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_a_forked_child_splits_its_work_over_threads_of_its_own():
    """A child forked after the pool started gets a new pool, not the parent's dead threads."""
    import os
    import signal

    from alphatune_runtime import dense_prefill

    # GEMMs long enough that both halves run at once: the pool starts its second thread.
    x, weight = random(512, 576).numpy(), random(1536, 576, seed=1).numpy()
    ops, out = dense_prefill.NumpyOps(), np.zeros((512, 1536), np.float32)
    with ops.threads(2):
        for _ in range(3):
            ops.matmul(x, weight, None, out)
    assert len(dense_prefill._pool()._threads) == 2
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit status
        signal.alarm(20)
        try:
            with ops.threads(2):
                ops.matmul(x, weight, None, out)
            os._exit(0 if np.allclose(out, x @ weight.T, rtol=1e-4, atol=1e-3) else 1)
        finally:
            os._exit(2)  # an error: never back into pytest in the child
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
