"""A Llama block stack ready for the numba step: its shape, its laid-out weights, its kernel.

``BlockStack`` is what both decode paths share: ``alphatune.engine.Engine`` (a transformers model,
embedding and head through its torch modules) and ``alphatune_runtime.model.Model`` (a saved
base read straight from its files, no torch). ``run`` sends a flat list of tokens through every
block in one numba call (``native.forward_tokens``) and returns the final-normed hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alphatune_runtime import native
from alphatune_runtime.cache import KVCache
from alphatune_runtime.dispatch import NativeKernel
from alphatune_runtime.errors import UnsupportedModelError
from alphatune_runtime.weights import NativeWeights

# Attention work (cached positions × heads, summed over a call's tokens) from which two threads
# pay for their start (~2 µs a region): below, a token's attention is a few microseconds. Measured
# on SmolLM2 (9 heads), 2 threads, blocks of one decode token, alternating in one process: at
# position 100, 5.50 / 5.09 ms with every attention parallel against 6.02 / 5.19 ms at the former
# 2^14; at position 500, 7.51 / 6.35 against 8.51 / 7.64 ms.
MIN_PARALLEL_ATTENTION = 1 << 9


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-family block stack, and its rotary frequencies."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    inv_freq: np.ndarray  # (head_dim / 2,) float32, the rotary frequencies
    rope_scaling: float  # transformers' attention_scaling: multiplies cos and sin
    max_positions: int  # 0: no limit known

    def rotary_tables(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin ``(length, head_dim)`` float32 C arrays, as ``LlamaRotaryEmbedding`` makes
        them: float32 angles ``position · inv_freq``, repeated for both halves."""
        positions = np.arange(length, dtype=np.float32)
        freqs = positions[:, None] * self.inv_freq.astype(np.float32)[None, :]  # (length, d/2)
        angles = np.concatenate([freqs, freqs], axis=-1)
        scaling = np.float32(self.rope_scaling)
        return (
            np.ascontiguousarray(np.cos(angles) * scaling, np.float32),
            np.ascontiguousarray(np.sin(angles) * scaling, np.float32),
        )


@dataclass
class BlockStack:
    """The blocks of a model, converted for ``native.forward_tokens``."""

    shape: Shape
    weights: NativeWeights
    kernel: NativeKernel
    kernel_tag: np.ndarray  # empty array whose dtype selects the kernel (native.KERNEL_TAGS)
    min_parallel_work: int  # code bits × tokens from which projections run on the threads
    min_parallel_attention: int = MIN_PARALLEL_ATTENTION

    @classmethod
    def of(cls, shape: Shape, weights: NativeWeights, kernel: NativeKernel) -> BlockStack:
        """The stack of laid-out ``weights`` (``dispatch.required_kernel`` has checked numba)."""
        return cls(
            shape=shape,
            weights=weights,
            kernel=kernel,
            kernel_tag=np.zeros(0, native.KERNEL_TAGS[kernel.name]),
            min_parallel_work=(
                kernel.module.MIN_PARALLEL_WORK  # AVX-512: one parallel region per projection
                if kernel.name == "avx512"
                else native.MIN_PARALLEL_GROUP_WORK
            ),
        )

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        if self.shape.max_positions and max_len > self.shape.max_positions:
            raise UnsupportedModelError(
                f"{max_len} positions exceed the model's {self.shape.max_positions}"
            )
        return KVCache.allocate(self.shape, rows, max_len)

    def rotary(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        return self.shape.rotary_tables(max_len)

    def run(
        self,
        hidden: np.ndarray,
        rows: np.ndarray,
        positions: np.ndarray,
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int,
    ) -> np.ndarray:
        """Final-normed hidden states ``(N, H)`` float32 of the embeddings ``hidden (N, H)``
        (overwritten: the residual stream). Token n goes to cache row ``rows[n]`` at
        ``positions[n]`` (int64 arrays) with adapter scale set ``sets[n]``; it attends to its
        row's positions up to its own, so a row's tokens must come in order, after every earlier
        position of that row. Numba's thread count must be ``threads`` (the caller sets it)."""
        w = self.weights
        cos, sin = rotary
        return native.forward_tokens(
            self.kernel_tag, hidden, rows, positions, sets, cache.keys, cache.values, cos, sin,
            w.norms, w.final_norm, w.codes, w.biases, w.ints,
            np.float32(self.shape.eps), self.shape.n_heads, threads,
            self.min_parallel_work, self.min_parallel_attention,
        )  # fmt: skip

    def load_step(self) -> None:
        """Run one token, so that numba loads the step's compiled code now (from its cache, or
        compiling it the first time)."""
        cache = self.new_cache(1, 1)
        zero = np.zeros(1, np.int64)
        hidden = np.zeros((1, self.shape.hidden), np.float32)
        self.run(hidden, zero, zero, zero, cache, self.rotary(1), 1)
