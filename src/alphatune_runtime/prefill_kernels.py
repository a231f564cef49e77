"""The dense prefill's work between its GEMMs, in a few numba calls instead of many torch ops.

``alphatune.engine.prefill`` runs a long prompt's projections as bfloat16 GEMMs. Around them a
block did ~25 small torch operations per layer (the norms, bfloat16 conversions, splitting the
heads, rotary, copying keys and values into the cache), each a full pass over the activations:
on SmolLM2 at 512 tokens, ~115 ms of a 430 ms prefill on one thread, against ~104 ms for all of
its GEMMs. Each kernel here does one of those stretches in one pass:

- ``rms_norm_into``: the pre-norm, written straight in the GEMM's dtype (bfloat16 bits or
  float32);
- ``add_update``: the residual add of a GEMM's output (bfloat16 bits or float32), after
  Gemma-3's sandwich norm where the block has one;
- ``heads_into_cache``: q, k and v from the stacked GEMM output, Gemma-3's query and key norms,
  rotary, queries into ``(heads, N, d)`` for attention and keys and values into the ``KVCache``.

Arithmetic is float32; bfloat16 inputs widen exactly, bfloat16 outputs round to nearest even
(``dequant.bfloat16_bits``). Rotary runs the formula of ``native.rotate`` and the torch path
without reassociation, so it gives their bits; the norms sum in their own order (the
reductions vectorise), within a float32 rounding of the torch ops they replace.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit, prange, types
    from numba.extending import overload

    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    IMPORT_ERROR = exc

# Reassociation lets LLVM vectorise the norms' sums; no assumption about NaN or inf is made.
_FAST = {"reassoc", "contract", "arcp"}


def available() -> bool:
    return IMPORT_ERROR is None


def _load(array, n, i):  # pragma: no cover - replaced by the overload
    """array[n, i] as float32; uint16 arrays hold bfloat16 bits."""


def _store(array, n, i, value):  # pragma: no cover - replaced by the overload
    """array[n, i] = value (float32), rounded to bfloat16 bits if array is uint16."""


if IMPORT_ERROR is None:
    from alphatune_runtime.dequant import bfloat16_bits

    @overload(_load, inline="always")
    def _load_overload(array, n, i):
        if array.dtype == types.uint16:

            def widen(array, n, i):  # pragma: no cover - numba
                # (numba widens a uint32 shift to uint64: narrow it back before the view)
                return np.uint32(np.uint32(array[n, i]) << np.uint32(16)).view(np.float32)

            return widen

        def plain(array, n, i):  # pragma: no cover - numba
            return np.float32(array[n, i])

        return plain

    @overload(_store, inline="always")
    def _store_overload(array, n, i, value):
        if array.dtype == types.uint16:

            def narrow(array, n, i, value):  # pragma: no cover - numba
                array[n, i] = bfloat16_bits(value)

            return narrow

        def plain(array, n, i, value):  # pragma: no cover - numba
            array[n, i] = value

        return plain

    @njit(parallel=True, cache=True, fastmath=_FAST)
    def rms_norm_into(x, weight, eps, out):  # pragma: no cover - numba
        """out[n] = x[n] / sqrt(mean(x[n]²) + eps) · weight; x (N, H) float32, out (N, H)
        float32 or bfloat16 bits (LlamaRMSNorm; Gemma's with its 1 + w folded into weight)."""
        n_tokens, width = x.shape
        for n in prange(n_tokens):
            total = np.float32(0.0)
            for i in range(width):
                total += x[n, i] * x[n, i]
            inverse = np.float32(1.0) / np.sqrt(total / np.float32(width) + eps)
            for i in range(width):
                _store(out, n, i, weight[i] * (x[n, i] * inverse))

    @njit(parallel=True, cache=True, fastmath=_FAST)
    def add_update(x, update, sandwich, weight, eps):  # pragma: no cover - numba
        """x[n] += update[n] (float32 or bfloat16 bits), or with ``sandwich`` its RMSNorm by
        ``weight`` (Gemma-3's post-attention and post-MLP norms)."""
        n_tokens, width = x.shape
        for n in prange(n_tokens):
            inverse = np.float32(1.0)
            if sandwich:
                total = np.float32(0.0)
                for i in range(width):
                    value = _load(update, n, i)
                    total += value * value
                inverse = np.float32(1.0) / np.sqrt(total / np.float32(width) + eps)
            for i in range(width):
                value = _load(update, n, i)
                x[n, i] += weight[i] * (value * inverse) if sandwich else value

    @njit(cache=True, fastmath=_FAST)
    def _head_norm(head, weight, eps):  # pragma: no cover - numba
        """In place on one head's d values: RMSNorm by weight (Gemma-3's query and key norms)."""
        total = np.float32(0.0)
        for i in range(head.shape[0]):
            total += head[i] * head[i]
        inverse = np.float32(1.0) / np.sqrt(total / np.float32(head.shape[0]) + eps)
        for i in range(head.shape[0]):
            head[i] = weight[i] * (head[i] * inverse)

    @njit(cache=True)
    def _rotate_into(head, cos, sin, out):  # pragma: no cover - numba
        """out = rotary(head) at one position (``native.rotate``'s formula and rounding)."""
        half = head.shape[0] // 2
        for i in range(half):
            a, b = head[i], head[half + i]
            out[i] = a * cos[i] - b * sin[i]
            out[half + i] = b * cos[half + i] + a * sin[half + i]

    @njit(parallel=True, cache=True)
    def heads_into_cache(
        qkv, begin, end, n_heads, n_kv_heads, q_norm, k_norm, with_qk_norm, eps, cos, sin,
        queries, keys, values,
    ):  # pragma: no cover - numba  # fmt: skip
        """One prompt's tokens ``begin..end`` of ``qkv (N, (heads + 2·kv)·d)`` (float32 or
        bfloat16 bits: q, k, v side by side) at positions ``0..end-begin-1``: queries normed
        (``with_qk_norm``) and rotated into ``queries (heads, N, d)`` at the same token index,
        keys normed and rotated into ``keys (kv, max_len, d)`` and values into ``values`` at
        their positions. ``cos``, ``sin``: ``(max_len, d)`` rotary tables of the layer."""
        head_dim = queries.shape[2]
        v_at = (n_heads + n_kv_heads) * head_dim
        scratch = np.empty((end - begin, head_dim), np.float32)  # one head at a time
        for n in prange(begin, end):
            position = n - begin
            head = scratch[position]
            for h in range(n_heads + n_kv_heads):
                for i in range(head_dim):
                    head[i] = _load(qkv, n, h * head_dim + i)
                if h < n_heads:
                    if with_qk_norm:
                        _head_norm(head, q_norm, eps)
                    _rotate_into(head, cos[position], sin[position], queries[h, n])
                else:
                    if with_qk_norm:
                        _head_norm(head, k_norm, eps)
                    _rotate_into(head, cos[position], sin[position], keys[h - n_heads, position])
            for h in range(n_kv_heads):
                for i in range(head_dim):
                    values[h, position, i] = _load(qkv, n, v_at + h * head_dim + i)
