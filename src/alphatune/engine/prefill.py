"""The engine's dense prefill: ``alphatune_runtime.dense_prefill``'s loop on torch's arithmetic.

On a CPU with native bfloat16 (AVX-512 BF16, AMX) a 512-token prompt through the LUT kernel took
2.72 s against 0.40 s for transformers' bf16 model (docs/performance.md). Here every projection
is dequantized into a bfloat16 buffer and applied as one bfloat16 GEMM (oneDNN, AMX), and
attention runs in torch's float32 flash kernel. Quality (``benchmarks/bench_prefill_precision.py``,
the 3-bit base over 8 x 512 WikiText-2 tokens): +0.03-0.05% perplexity against float32; with the
attention in bfloat16 too, +0.12-0.14%, over the project's 0.1% rule for a lossy default, hence
float32 attention. On CPUs without native bfloat16 the GEMMs run in float32 (``dense_dtype``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from alphatune.kernels.numba_threads import numba_threads
from alphatune_runtime import dense_prefill
from alphatune_runtime.cache import KVCache
from alphatune_runtime.cpu import native_bfloat16
from alphatune_runtime.dense_prefill import (  # noqa: F401 - the engine's names for them
    MAX_PASS_TOKENS,
    MIN_FLOAT32_TOKENS,
    MIN_TOKENS,
    PREFILL_ENV,
    Prompt,
    passes,
    prefill_setting,
)
from alphatune_runtime.stack import BlockStack


def dense_dtype(tokens: int) -> torch.dtype | None:
    """The GEMM dtype for ``tokens`` prompt tokens (per scale set), or None for the LUT kernel
    (``ALPHATUNE_PREFILL``: ``dense_prefill.takes_dense_path``)."""
    choice = prefill_setting()
    bfloat16 = choice == "bf16" or (choice == "auto" and native_bfloat16())
    if not dense_prefill.takes_dense_path(tokens, MIN_TOKENS if bfloat16 else MIN_FLOAT32_TOKENS):
        return None
    return torch.bfloat16 if bfloat16 else torch.float32


class TorchOps:
    """``dense_prefill.DenseOps`` on torch: bfloat16 (or float32) GEMMs through oneDNN, attention
    through ``scaled_dot_product_attention`` in ``attention_dtype`` (float32: bfloat16 costs more
    than the GEMMs in quality; measured, not a setting), the activation in place."""

    def __init__(self, dtype: torch.dtype, attention_dtype: torch.dtype = torch.float32) -> None:
        self.torch_dtype = dtype
        self.dtype = np.uint16 if dtype == torch.bfloat16 else np.float32
        self.attention_dtype = attention_dtype
        self._masks: dict[tuple[int, int], Tensor] = {}

    @contextlib.contextmanager
    def threads(self, count: int) -> Iterator[None]:
        # numba_threads gives torch its own thread count back after numba's pool starts.
        with torch.inference_mode(), numba_threads(count):
            yield

    def matmul(
        self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray
    ) -> None:
        xt, wt, yt = (_tensor(a) for a in (x, weight, out))
        if bias is None:
            torch.mm(xt, wt.t(), out=yt)
        else:
            torch.addmm(torch.from_numpy(bias).to(self.torch_dtype), xt, wt.t(), out=yt)

    def attention(
        self, cache: KVCache, layer: int, row: int, queries: np.ndarray, window: int,
        scale: float, out: np.ndarray,
    ) -> None:  # fmt: skip
        length = queries.shape[0]
        q = torch.from_numpy(queries).transpose(0, 1)  # (heads, T, d)
        k = torch.from_numpy(cache.keys[layer, row, :, :length])
        v = torch.from_numpy(cache.values[layer, row, :, :length])
        mask = self._mask(length, window)
        attended = F.scaled_dot_product_attention(
            *(t.to(self.attention_dtype)[None] for t in (q, k, v)),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )  # fmt: skip
        _tensor(out).copy_(attended[0].transpose(0, 1).reshape(length, -1))

    def _mask(self, length: int, window: int) -> Tensor | None:
        """The boolean ``(T, T)`` mask of a sliding-window layer (causal, and the last
        ``window`` positions: transformers' kv > q - window), or None where causal is enough."""
        if window <= 0 or length <= window:
            return None
        if (length, window) not in self._masks:
            query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
            self._masks[length, window] = (key <= query) & (key > query - window)
        return self._masks[length, window]

    def activate(self, gate: np.ndarray, up: np.ndarray, gelu: bool) -> np.ndarray:
        g = _tensor(gate)  # a view of gate·up's buffer: in place, no new multi-MiB tensor
        if gelu:
            torch.ops.aten.gelu_(g, approximate="tanh")
        else:
            F.silu(g, inplace=True)
        torch.mul(g, _tensor(up), out=g)
        return gate


def _tensor(array: np.ndarray) -> Tensor:
    """A numpy array as a tensor sharing its memory; uint16 arrays hold bfloat16 bits."""
    if array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class DensePrefill:
    """The engine's dense prefill: ``dense_prefill.DensePrefill`` with ``TorchOps``."""

    def __init__(self, stack: BlockStack) -> None:
        self.loop = dense_prefill.DensePrefill(stack)

    def run(
        self,
        hidden: np.ndarray,
        prompts: Sequence[Prompt],
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int,
        dtype: torch.dtype,
        *,
        every_position: bool = False,
        attention_dtype: torch.dtype = torch.float32,
    ) -> np.ndarray:
        """``dense_prefill.DensePrefill.run`` with GEMMs in ``dtype`` (bfloat16 or float32)."""
        ops = TorchOps(dtype, attention_dtype)
        return self.loop.run(
            hidden, prompts, cache, rotary, threads, ops, every_position=every_position
        )
