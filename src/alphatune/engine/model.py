"""``Engine``: a quantized Llama ready for native decode (weights converted once per request set).

``Engine.build(model)`` checks the model (``spec.describe``), maps its embedding and head
(``spec.token_io``) and converts the blocks (``weights.build_weights``); ``forward`` runs a flat
list of tokens through every block in one numba call (``native.forward_tokens``) and ``logits``
applies the model's own head module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from alphatune.engine.cache import KVCache
from alphatune.engine.spec import LlamaSpec, TokenIO, describe, token_io
from alphatune.engine.weights import NativeWeights, build_weights
from alphatune.errors import UnsupportedModelError
from alphatune.kernels import decode_kernel
from alphatune.kernels.numba_threads import numba_threads
from alphatune.memory import page_out_compiler, release_free_memory
from alphatune_runtime import native

logger = logging.getLogger(__name__)

# Attention work (cached positions × heads, summed over a call's tokens) from which two threads
# pay for their start (~2 µs a region): below, a token's attention is a few microseconds. Measured
# on SmolLM2 (9 heads), 2 threads, blocks of one decode token, alternating in one process: at
# position 100, 5.50 / 5.09 ms with every attention parallel against 6.02 / 5.19 ms at the former
# 2^14; at position 500, 7.51 / 6.35 against 8.51 / 7.64 ms.
MIN_PARALLEL_ATTENTION = 1 << 9


def _numba_pool_size() -> int:
    from numba import config

    return int(config.NUMBA_NUM_THREADS)


@dataclass
class Engine:
    """A model converted for ``native.forward_tokens``; build with ``Engine.build``."""

    spec: LlamaSpec
    io: TokenIO
    weights: NativeWeights
    kernel_name: str
    kernel_tag: np.ndarray  # empty array whose dtype selects the kernel (native.KERNEL_TAGS)
    table_bits: int  # the AVX2 kernel's tables: 0 float32, 16 or 8 integer levels
    min_parallel_work: int  # code bits × tokens from which projections run on the threads
    min_parallel_attention: int = MIN_PARALLEL_ATTENTION

    @classmethod
    def build(cls, model: nn.Module, *, use_bank: bool = False) -> Engine:
        """Convert ``model``; ``UnsupportedModelError`` says why it cannot (the caller falls back).

        ``use_bank``: projections holding a mixed-batch adapter bank serve one scale set per
        adapter (``forward``'s ``sets``); otherwise the layers' own scales.
        """
        if not native.available():
            raise UnsupportedModelError(
                "the decode engine needs numba (pip install alphatune[fast])"
            )
        kernel = decode_kernel()
        if kernel is None:
            raise UnsupportedModelError(
                "no LUT kernel runs here (no AVX2 + FMA, or ALPHATUNE_KERNEL=reference)"
            )
        if model.training:
            raise UnsupportedModelError("the model is in training mode; call model.eval()")
        # Start numba's thread pool now, under numba_threads (which gives torch its count back):
        # the first start resets the process-wide OpenMP count that torch reads, and would
        # otherwise do so inside the first module call of a request.
        with numba_threads(1):
            pass
        spec = describe(model)
        io = token_io(model, spec.hidden)
        weights = build_weights(spec, kernel, use_bank)
        release_free_memory()  # what converting the layers freed
        engine = cls(
            spec=spec,
            io=io,
            weights=weights,
            kernel_name=kernel.name,
            kernel_tag=np.zeros(0, native.KERNEL_TAGS[kernel.name]),
            table_bits=kernel.table_bits,
            min_parallel_work=(
                kernel.module.MIN_PARALLEL_WORK  # AVX-512: one parallel region per projection
                if kernel.name == "avx512"
                else native.MIN_PARALLEL_GROUP_WORK
            ),
        )
        engine._load_step()
        return engine

    def _load_step(self) -> None:
        """Run one token, so that numba loads the step's compiled code now (from its cache, or
        compiling it the first time), then page out numba's compiler: decode never runs it, and
        it would otherwise stay resident (~28 MiB, more than the KV cache of a 512-token prompt).
        The embedding and head modules were run once by ``token_io``."""
        cache = self.new_cache(1, 1)
        zero = np.zeros(1, np.int64)
        hidden = np.zeros((1, self.spec.hidden), np.float32)
        self.run_blocks(hidden, zero, zero, zero, cache, self.rotary(1), 1)
        page_out_compiler()

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        if self.spec.max_positions and max_len > self.spec.max_positions:
            raise UnsupportedModelError(
                f"{max_len} positions exceed the model's {self.spec.max_positions}"
            )
        return KVCache.allocate(self.spec, rows, max_len)

    def forward(
        self,
        ids: Tensor,
        rows: np.ndarray,
        positions: np.ndarray,
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int | None = None,
    ) -> Tensor:
        """Final-normed hidden states ``(N, H)`` float32 of tokens ``ids (N,)``.

        Token n goes to cache row ``rows[n]`` at ``positions[n]`` (int64 arrays) with adapter
        scale set ``sets[n]``; it attends to its row's positions up to its own, so a row's tokens
        must come in order, after every earlier position of that row. ``threads``: see
        ``threads``; None reads it now.
        """
        if threads is None:
            threads = self.threads()
        return self.run_blocks(self.embed(ids), rows, positions, sets, cache, rotary, threads)

    @staticmethod
    def threads() -> int:
        """Threads a native call may use: torch's count, capped by numba's pool.

        Read it once per request, before any module runs: a numba parallel call elsewhere (say
        in an embedding module) can reset the process-wide OpenMP count that torch reports.
        """
        return max(1, min(torch.get_num_threads(), _numba_pool_size()))

    def embed(self, ids: Tensor) -> np.ndarray:
        """``(N, H)`` float32 embeddings of ``ids``, a writable C array (the residual stream)."""
        hidden = self.io.embed(ids).numpy()
        if not hidden.flags.writeable or not hidden.flags.c_contiguous:
            hidden = np.ascontiguousarray(hidden).copy()
        return hidden

    def run_blocks(
        self,
        hidden: np.ndarray,
        rows: np.ndarray,
        positions: np.ndarray,
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int,
    ) -> Tensor:
        """``forward`` after the embedding: ``hidden (N, H)`` is overwritten."""
        w = self.weights
        cos, sin = rotary
        args = (
            self.kernel_tag, hidden, rows, positions, sets, cache.keys, cache.values, cos, sin,
            w.norms, w.final_norm, w.codes, w.biases, w.ints,
            np.float32(self.spec.eps), self.spec.n_heads, threads,
            self.min_parallel_work, self.min_parallel_attention,
        )  # fmt: skip
        if threads > 1:
            with numba_threads(threads):
                normed = native.forward_tokens(*args)
        else:
            normed = native.forward_tokens(*args)
        return torch.from_numpy(normed)

    def logits(self, hidden: Tensor) -> Tensor:
        """``(N, V)`` float32 logits through the model's own head module."""
        return self.io.head(hidden)

    def rotary(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = self.spec.rotary_tables(max_len)
        return cos.contiguous().numpy(), sin.contiguous().numpy()
