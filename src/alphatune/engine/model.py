"""``Engine``: a quantized model (Llama family, Gemma-3) ready for native decode (weights converted
once per request set).

``Engine.build(model)`` checks the model (``spec.describe``), maps its embedding and head
(``spec.token_io``) and converts the blocks (``weights.build_weights``) into an
``alphatune_runtime.stack.BlockStack``; ``forward`` runs a flat list of tokens through every block
in one numba call and ``logits`` applies the model's own head module. It is a ``Decoder`` of
``alphatune_runtime.generate`` (numpy in and out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from alphatune.engine.prefill import MAX_PASS_TOKENS, DensePrefill, dense_dtype
from alphatune.engine.spec import ModelSpec, TokenIO, describe, token_io
from alphatune.engine.weights import build_weights
from alphatune.errors import UnsupportedModelError
from alphatune.kernels.numba_threads import numba_threads
from alphatune.memory import page_out_compiler, release_free_memory
from alphatune_runtime.cache import KVCache
from alphatune_runtime.dense_prefill import batch_of, run_in_passes, tokens_per_scale_set
from alphatune_runtime.dispatch import required_kernel
from alphatune_runtime.stack import BlockStack
from alphatune_runtime.weights import NativeWeights

logger = logging.getLogger(__name__)


def _numba_pool_size() -> int:
    from numba import config

    return int(config.NUMBA_NUM_THREADS)


@dataclass
class Engine:
    """A model converted for ``native.forward_tokens``; build with ``Engine.build``."""

    spec: ModelSpec
    io: TokenIO
    stack: BlockStack
    dense: DensePrefill

    @classmethod
    def build(cls, model: nn.Module, *, use_bank: bool = False) -> Engine:
        """Convert ``model``; ``UnsupportedModelError`` says why it cannot (the caller falls back).

        ``use_bank``: projections holding a mixed-batch adapter bank serve one scale set per
        adapter (``forward``'s ``sets``); otherwise the layers' own scales.
        """
        kernel = required_kernel()
        if model.training:
            raise UnsupportedModelError("the model is in training mode; call model.eval()")
        # Start numba's thread pool now, under numba_threads (which gives torch its count back):
        # the first start resets the process-wide OpenMP count that torch reads, and would
        # otherwise do so inside the first module call of a request.
        with numba_threads(1):
            pass
        spec = describe(model)
        io = token_io(model, spec.shape.hidden)
        weights = build_weights(spec, kernel, use_bank)
        release_free_memory()  # what converting the layers freed
        stack = BlockStack.of(spec.shape, weights, kernel)
        engine = cls(spec=spec, io=io, stack=stack, dense=DensePrefill(stack))
        # Load the step's compiled code now, then page out numba's compiler: decode never runs
        # it, and it would otherwise stay resident (~28 MiB, more than the KV cache of a
        # 512-token prompt). The embedding and head modules were run once by ``token_io``.
        engine.stack.load_step()
        page_out_compiler()
        return engine

    @property
    def kernel_name(self) -> str:
        return self.stack.kernel.name

    @property
    def weights(self) -> NativeWeights:
        return self.stack.weights

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return self.stack.new_cache(rows, max_len)

    def rotary(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        return self.stack.rotary(max_len)

    @staticmethod
    def threads() -> int:
        """Threads a native call may use: torch's count, capped by numba's pool.

        Read it once per request, before any module runs: a numba parallel call elsewhere (say
        in an embedding module) can reset the process-wide OpenMP count that torch reports.
        """
        return max(1, min(torch.get_num_threads(), _numba_pool_size()))

    def forward(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        positions: np.ndarray,
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int | None = None,
    ) -> np.ndarray:
        """Final-normed hidden states ``(N, H)`` float32 of tokens ``ids (N,)`` int64.

        Token n goes to cache row ``rows[n]`` at ``positions[n]`` (int64 arrays) with adapter
        scale set ``sets[n]`` (see ``BlockStack.run``). ``threads``: see ``threads``; None reads
        it now.
        """
        if threads is None:
            threads = self.threads()
        return self.run_blocks(self.embed(ids), rows, positions, sets, cache, rotary, threads)

    def prefill_prompts(
        self,
        prompts: Sequence[np.ndarray],
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int,
    ) -> np.ndarray | None:
        """The final-normed hidden states ``(P, H)`` of the prompts' last tokens (prompt p in
        cache row p, adapter ``sets[p]``) through dense GEMMs (``prefill.DensePrefill``), or
        None where that path does not pay for these prompts (``prefill.dense_dtype`` of their
        tokens together per adapter scale set: one dequantization serves all of a set's
        prompts); the caller then runs them through ``forward``."""
        batch = batch_of(prompts, sets, self.stack.weights.banked)
        dtype = dense_dtype(tokens_per_scale_set(batch))
        if dtype is None:
            return None
        return run_in_passes(
            lambda hidden, part: self.dense.run(hidden, part, cache, rotary, threads, dtype),
            self.embed, prompts, batch, MAX_PASS_TOKENS,
        )  # fmt: skip

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """``(N, H)`` float32 embeddings of ``ids``, a writable C array (the residual stream)."""
        with torch.inference_mode():
            hidden = self.io.embed(torch.from_numpy(np.asarray(ids, np.int64))).numpy()
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
    ) -> np.ndarray:
        """``forward`` after the embedding: ``hidden (N, H)`` is overwritten."""
        if threads > 1:
            with numba_threads(threads):
                return self.stack.run(hidden, rows, positions, sets, cache, rotary, threads)
        return self.stack.run(hidden, rows, positions, sets, cache, rotary, threads)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """``(N, V)`` float32 logits through the model's own head module."""
        with torch.inference_mode():
            return self.io.head(torch.from_numpy(hidden)).numpy()
