"""A block stack (Llama or Gemma-3 form) ready for the numba step: its shape, weights, kernel.

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
from alphatune_runtime.forms import LLAMA_BLOCK, BlockForm
from alphatune_runtime.weights import NativeWeights

# Attention work (cached positions × heads, summed over a call's tokens) from which two threads
# pay for their start (~2 µs a region): below, a token's attention is a few microseconds. Measured
# on SmolLM2 (9 heads), 2 threads, blocks of one decode token, alternating in one process: at
# position 100, 5.50 / 5.09 ms with every attention parallel against 6.02 / 5.19 ms at the former
# 2^14; at position 500, 7.51 / 6.35 against 8.51 / 7.64 ms.
MIN_PARALLEL_ATTENTION = 1 << 9


@dataclass(frozen=True)
class Shape:
    """The sizes of a block stack, its rotary frequencies and its block's form."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    inv_freq: np.ndarray  # (head_dim / 2,) float32, the rotary frequencies (of global layers)
    rope_scaling: float  # transformers' attention_scaling: multiplies cos and sin
    max_positions: int  # 0: no limit known
    block: BlockForm = LLAMA_BLOCK

    @property
    def norms_per_block(self) -> int:
        """How many norms a block has (``forms.BlockForm.norm_modules``)."""
        return len(self.block.norm_modules)

    def attention_scale(self) -> float:
        """What multiplies q·k: the block form's (Gemma-3: query_pre_attn_scalar^-0.5), else
        1/sqrt(head_dim)."""
        return self.block.attention_scale or self.head_dim**-0.5

    def layer_windows(self) -> np.ndarray:
        """``(L,)`` int64: each layer's sliding window, 0 for full attention."""
        windows = self.block.windows or (0,) * self.n_layers
        return np.asarray(windows, np.int64)

    def layer_rotary(self) -> np.ndarray:
        """``(L,)`` int64: which of ``rotary_tables``' tables each layer uses."""
        if self.block.local_inv_freq is None:
            return np.zeros(self.n_layers, np.int64)
        return (self.layer_windows() > 0).astype(np.int64)

    def rotary_tables(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin ``(R, length, head_dim)`` float32 C arrays, as ``LlamaRotaryEmbedding`` makes
        them: float32 angles ``position · inv_freq``, repeated for both halves. R is 1, or 2
        when windowed layers have their own frequencies (``layer_rotary`` picks one a layer)."""
        kinds = [(self.inv_freq, self.rope_scaling)]
        if self.block.local_inv_freq is not None:
            kinds.append((self.block.local_inv_freq, self.block.local_rope_scaling))
        tables = [_rotary_table(length, inv_freq, scaling) for inv_freq, scaling in kinds]
        return (
            np.ascontiguousarray(np.stack([cos for cos, _ in tables])),
            np.ascontiguousarray(np.stack([sin for _, sin in tables])),
        )


def _rotary_table(
    length: int, inv_freq: np.ndarray, scaling: float
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``(length, head_dim)`` float32 of one set of frequencies, times ``scaling``."""
    positions = np.arange(length, dtype=np.float32)
    freqs = positions[:, None] * inv_freq.astype(np.float32)[None, :]  # (length, d/2)
    angles = np.concatenate([freqs, freqs], axis=-1)
    factor = np.float32(scaling)
    cos = (np.cos(angles) * factor).astype(np.float32)
    return cos, (np.sin(angles) * factor).astype(np.float32)


@dataclass
class BlockStack:
    """The blocks of a model, converted for ``native.forward_tokens``."""

    shape: Shape
    weights: NativeWeights
    kernel: NativeKernel
    kernel_tag: np.ndarray  # empty array whose dtype selects the kernel (native.KERNEL_TAGS)
    min_parallel_work: int  # code bits × tokens from which projections run on the threads
    layer_rotary: np.ndarray  # Shape.layer_rotary(), made once
    layer_windows: np.ndarray  # Shape.layer_windows(), made once
    min_parallel_attention: int = MIN_PARALLEL_ATTENTION

    @classmethod
    def of(cls, shape: Shape, weights: NativeWeights, kernel: NativeKernel) -> BlockStack:
        """The stack of laid-out ``weights`` (``dispatch.required_kernel`` has checked numba);
        ``UnsupportedModelError`` where the weights do not have the norms the block's form
        reads (the step would read past them)."""
        _check_form(shape, weights)
        return cls(
            shape=shape,
            weights=weights,
            kernel=kernel,
            layer_rotary=shape.layer_rotary(),
            layer_windows=shape.layer_windows(),
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
        w, shape = self.weights, self.shape
        cos, sin = rotary
        return native.forward_tokens(
            self.kernel_tag, hidden, rows, positions, sets, cache.keys, cache.values, cos, sin,
            self.layer_rotary, self.layer_windows, w.norms, w.qk_norms, w.final_norm,
            w.codes, w.biases, w.ints, np.float32(shape.eps), np.float32(shape.attention_scale()),
            shape.block.sandwich_norms, shape.block.qk_norm, shape.block.gelu, shape.n_heads,
            threads, self.min_parallel_work, self.min_parallel_attention,
        )  # fmt: skip

    def load_step(self) -> None:
        """Run one token, so that numba loads the step's compiled code now (from its cache, or
        compiling it the first time)."""
        cache = self.new_cache(1, 1)
        zero = np.zeros(1, np.int64)
        hidden = np.zeros((1, self.shape.hidden), np.float32)
        self.run(hidden, zero, zero, zero, cache, self.rotary(1), 1)


def _check_form(shape: Shape, weights: NativeWeights) -> None:
    """The norms and query/key norms that ``shape``'s block form reads, and a window for every
    layer: what the step indexes without bounds checks."""
    expected = (shape.n_layers, shape.norms_per_block, shape.hidden)
    qk = (shape.n_layers, 2, shape.head_dim if shape.block.qk_norm else 0)
    if weights.norms.shape != expected or weights.qk_norms.shape != qk:
        raise UnsupportedModelError(
            f"norm weights {weights.norms.shape} and query/key norms {weights.qk_norms.shape}; "
            f"the block's form reads {expected} and {qk}"
        )
    if len(shape.block.windows) not in (0, shape.n_layers):  # none: every layer full
        raise UnsupportedModelError(
            f"{len(shape.block.windows)} sliding windows for {shape.n_layers} layers"
        )
