"""Prefill through dense GEMMs, bfloat16 on CPUs that have it, into the engine's KV cache.

The LUT kernel's cost grows with the tokens of a call; a GEMM's barely does, once its weight is
dense. On a CPU with native bfloat16 (AVX-512 BF16, AMX) a 512-token prompt through the LUT
kernel took 2.72 s against 0.40 s for transformers' bf16 model (docs/performance.md). Here a
batch of prompts runs through each block as that model would: every projection is dequantized
from the engine's own codes and scales into a reused bfloat16 buffer (``alphatune_runtime
.dequant``, the projections that read one input stacked into one weight, once per adapter scale
set in the batch) and applied as one GEMM; norms, rotary and attention (per prompt) stay
float32, and the keys and values go into the engine's ``KVCache``, where decode continues. The
work between the GEMMs runs in a few numba calls per block (``alphatune_runtime
.prefill_kernels``), and the GEMMs write into reused buffers.
Quality (``benchmarks/bench_prefill_precision.py``, the 3-bit base over 8 x 512 WikiText-2
tokens): +0.031% perplexity against float32; with the attention in bfloat16 too, +0.137%, over
the project's 0.1% rule for a lossy default, hence float32 attention.

``ALPHATUNE_PREFILL`` chooses: ``auto`` (the default: bfloat16 when the prompts hold at least
``MIN_TOKENS`` tokens per scale set and the CPU has native bfloat16; float32 GEMMs from
``MIN_FLOAT32_TOKENS`` tokens on CPUs without it; else the LUT kernel), ``bf16`` or ``float32``
(the dense path for any prompts; float32 is exact up to summation order), or ``lut`` (never).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from alphatune.errors import ConfigError
from alphatune.kernels.numba_threads import numba_threads
from alphatune_runtime import dequant, layout, native
from alphatune_runtime import prefill_kernels as kernels
from alphatune_runtime.cache import KVCache
from alphatune_runtime.stack import BlockStack

PREFILL_ENV = "ALPHATUNE_PREFILL"
CHOICES = ("auto", "bf16", "float32", "lut")
# Prompt tokens from which ``auto`` takes the dense path: its fixed cost (dequantizing every
# layer) equals what the LUT kernel spends on ~60 prompt tokens. SmolLM2 3-bit, Xeon with AMX
# (``benchmarks/bench_prefill.py``, ``results/prefill_threshold.json``): 48 tokens 0.19 s LUT vs
# 0.24 s dense on 1 thread, 64 tokens 0.26 vs 0.25 s, 96 tokens 0.38 vs 0.27 s; the same
# crossing on 2 threads.
MIN_TOKENS = 64
# The same crossing for float32 GEMMs, where the CPU has no native bfloat16: SmolLM2 3-bit on the
# Xeon with MKL, oneDNN and numba held to AVX2 (``MKL_ENABLE_INSTRUCTIONS=AVX2
# ONEDNN_MAX_CPU_ISA=AVX2 NUMBA_CPU_NAME=haswell``, ``bench_prefill.py --paths lut float32``,
# ``results/prefill_float32_avx2.json``): 64 tokens 0.23 s LUT vs 0.33 s dense on 1 thread,
# 128 tokens 0.46 vs 0.48 s, 512 tokens 2.19 vs 1.50 s; on 2 threads 64 tokens 0.14 vs 0.18 s,
# 128 tokens 0.29 vs 0.27 s, 512 tokens 1.28 vs 0.79 s.
MIN_FLOAT32_TOKENS = 128
# Tokens per dense pass at most: a pass holds every token's activations at once (~30 KiB a
# token for SmolLM2), and each pass costs one more dequantization (~0.1 s), so a big batch goes
# in passes of whole prompts of about this many tokens (~60 MiB of activations).
MAX_PASS_TOKENS = 2048


def prefill_setting() -> str:
    """``ALPHATUNE_PREFILL`` as a choice (``auto`` if unset); a bad value is a ``ConfigError``."""
    setting = os.environ.get(PREFILL_ENV, "")
    choice = setting.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{PREFILL_ENV}={setting!r}; choose one of {', '.join(CHOICES)}")
    return choice


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), so oneDNN's bf16
    GEMM beats float32 rather than emulating it."""
    import llvmlite.binding as llvm_binding

    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("avx512bf16", False) or features.get("amx-bf16", False))


def dense_dtype(tokens: int) -> torch.dtype | None:
    """The GEMM dtype for a ``tokens``-token prompt, or None for the LUT kernel."""
    choice = prefill_setting()
    if choice == "bf16":
        return torch.bfloat16
    if choice == "float32":
        return torch.float32
    if choice != "auto":
        return None
    if native_bfloat16():
        return torch.bfloat16 if tokens >= MIN_TOKENS else None
    return torch.float32 if tokens >= MIN_FLOAT32_TOKENS else None


@dataclass(frozen=True)
class Prompt:
    """One prompt of a batch: its cache row, its length, its adapter scale set."""

    row: int
    length: int
    scale_set: int = 0


# Scale set -> the indices of its prompts' tokens (in the batch's flat token order); None: all.
ScaleGroups = dict[int, Tensor | None]


def passes(prompts: Sequence[Prompt], most: int) -> list[list[Prompt]]:
    """``prompts`` in order, cut into runs of at most ``most`` tokens (a longer prompt alone)."""
    runs: list[list[Prompt]] = [[]]
    held = 0
    for prompt in prompts:
        if runs[-1] and held + prompt.length > most:
            runs.append([])
            held = 0
        runs[-1].append(prompt)
        held += prompt.length
    return runs


def _by_scale_set(prompts: Sequence[Prompt], spans: list[tuple[int, int]]) -> ScaleGroups:
    tokens: dict[int, list[int]] = {}
    for prompt, (begin, end) in zip(prompts, spans, strict=True):
        tokens.setdefault(prompt.scale_set, []).extend(range(begin, end))
    if len(tokens) == 1:
        return {next(iter(tokens)): None}
    return {s: torch.tensor(t, dtype=torch.long) for s, t in tokens.items()}


class DensePrefill:
    """Runs prompts through a ``BlockStack``'s blocks as dense GEMMs (see the module docstring).

    Every operand comes from the stack, where decode reads it: the codes in the kernel's layout,
    the scales, offsets and biases at the addresses in its integer table. So prefill and decode
    always use the same weights, whichever of them the kernel keeps as a copy (AVX-512's
    rows-inner scales, padded rows, an α₁ multiplier) or reads in the layer (AVX2's scales).
    """

    def __init__(self, stack: BlockStack) -> None:
        self.stack = stack
        self.inverse = dequant.inverse_byte_map(stack.kernel.byte_map)
        self.rows_inner = stack.kernel.scales_layout == layout.ROWS_INNER
        self._buffers: dict[tuple[str, int, int, torch.dtype], Tensor] = {}

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
        """The final-normed hidden states ``(P, H)`` of each prompt's last token (``(N, H)``, of
        every token, with ``every_position``).

        ``hidden (N, H)`` float32 is the prompts' embeddings one after another (overwritten: the
        residual stream); ``prompts`` says whose they are (``Prompt``: cache row, length,
        adapter scale set), positions ``0..length-1`` of each row. Every layer is dequantized
        once per scale set in the batch and applied to all of its prompts' tokens in one GEMM;
        attention runs per prompt. ``dtype``: the GEMMs' (bfloat16 or float32);
        ``attention_dtype``: the attention's (bfloat16 costs more than the GEMMs in quality:
        measured, not a setting).
        """
        shape = self.stack.shape
        x = torch.from_numpy(hidden)
        ends = np.cumsum([p.length for p in prompts])
        if any(p.length < 1 for p in prompts):
            raise ConfigError(
                f"every prompt needs a token, got lengths {[p.length for p in prompts]}"
            )
        if not prompts or ends[-1] != x.shape[0]:
            raise ConfigError(f"{x.shape[0]} embeddings for prompts of lengths "
                              f"{[p.length for p in prompts]}")  # fmt: skip
        if max(p.length for p in prompts) > cache.max_len:
            raise ConfigError(f"a prompt longer than the {cache.max_len}-position cache")
        spans = [(int(end) - p.length, int(end)) for p, end in zip(prompts, ends, strict=True)]
        layer_rotary, windows = self.stack.layer_rotary, self.stack.layer_windows
        masks = _window_masks(prompts, windows)
        groups = _by_scale_set(prompts, spans)
        keys, values = torch.from_numpy(cache.keys), torch.from_numpy(cache.values)
        weights = self.stack.weights
        norms, qk_norms = weights.norms, weights.qk_norms
        form = shape.block
        mlp_norm, post_mlp = (
            native.SANDWICH_MLP_NORMS if form.sandwich_norms else native.LLAMA_MLP_NORMS
        )
        # In place on gate (a view of gate·up's buffer): no new multi-MiB tensor per layer.
        activation = (
            functools.partial(torch.ops.aten.gelu_, approximate="tanh")
            if form.gelu
            else functools.partial(F.silu, inplace=True)
        )
        heads, kv_heads, head_dim = shape.n_heads, shape.n_kv_heads, shape.head_dim
        scale, eps = shape.attention_scale(), np.float32(shape.eps)
        tokens = x.shape[0]
        queries = torch.empty(heads, tokens, head_dim)  # every layer's, rotated
        attention = torch.empty(tokens, heads * head_dim, dtype=dtype)  # o_proj's input
        normed = torch.empty(tokens, x.shape[1], dtype=dtype)  # the GEMMs' input after a norm
        # One numba thread count for the whole batch (the dequantization and the kernels
        # between the GEMMs are numba calls); torch's own count is given back at the end.
        with torch.inference_mode(), numba_threads(threads):
            for layer in range(shape.n_layers):
                base = 7 * layer
                kernels.rms_norm_into(hidden, norms[layer, 0], eps, _bits(normed))
                qkv = self._project(normed, base, (0, 1, 2), groups, dtype)
                table = int(layer_rotary[layer])
                for index, (prompt, (begin, end)) in enumerate(zip(prompts, spans, strict=True)):
                    kernels.heads_into_cache(
                        _bits(qkv), begin, end, heads, kv_heads, qk_norms[layer, 0],
                        qk_norms[layer, 1], form.qk_norm, eps, rotary[0][table],
                        rotary[1][table], queries.numpy(), cache.keys[layer, prompt.row],
                        cache.values[layer, prompt.row],
                    )  # fmt: skip
                    # (heads, T, d), float32: attention in bfloat16 cost 4x the GEMMs' perplexity.
                    one = (
                        t.to(attention_dtype)[None]
                        for t in (
                            queries[:, begin:end],
                            keys[layer, prompt.row, :, : prompt.length],
                            values[layer, prompt.row, :, : prompt.length],
                        )
                    )
                    mask = masks.get((index, int(windows[layer])))
                    out = F.scaled_dot_product_attention(
                        *one, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
                    )
                    attention[begin:end] = out[0].transpose(0, 1).reshape(end - begin, -1)
                update = self._project(attention, base, (3,), groups, dtype)
                sandwich = form.sandwich_norms
                kernels.add_update(hidden, _bits(update), sandwich, norms[layer, 1], eps)
                kernels.rms_norm_into(hidden, norms[layer, mlp_norm], eps, _bits(normed))
                gate_up = self._project(normed, base, (4, 5), groups, dtype)
                gate, up = gate_up.split(gate_up.shape[1] // 2, 1)
                # In the GEMMs' dtype, as the bf16 model runs its MLP: the next GEMM's input.
                activated = torch.mul(activation(gate), up, out=gate)
                update = self._project(activated, base, (6,), groups, dtype)
                kernels.add_update(hidden, _bits(update), sandwich, norms[layer, post_mlp], eps)
            last = x if every_position else x[torch.from_numpy(ends - 1)]
            out = self._rms_norm(last, torch.from_numpy(self.stack.weights.final_norm))
        self._buffers.clear()  # a few MiB, needed again only by the next long prompt
        return out.numpy()

    def _rms_norm(self, x: Tensor, weight: Tensor) -> Tensor:
        """LlamaRMSNorm over the last dimension, in float32."""
        x = x.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(variance + self.stack.shape.eps))

    def _project(
        self, x: Tensor, base: int, which: tuple[int, ...], groups: ScaleGroups, dtype: torch.dtype
    ) -> Tensor:
        """``x (N, in)`` through projections ``base + which`` (they read one input), their
        outputs side by side, ``(N, Σ out)`` in ``dtype``: per scale set, one GEMM of its tokens
        on the projections' stacked weight (one GEMM for all when none of them is banked).

        The result is a buffer reused by the same projections of every layer, valid until
        then: each is consumed before the next layer's.
        """
        ints = self.stack.weights.ints
        indices = [base + i for i in which]
        widths = [int(ints[i, native.OUT_FEATURES]) for i in indices]
        weight = self._buffer("weight", sum(widths), x.shape[1], dtype)
        bias = self._bias(indices, widths, dtype)
        if not any(ints[i, native.BANKED] for i in indices):
            groups = {0: None}  # the layers' own scales for every token
        # A fresh multi-MiB output every GEMM cost page faults: gate·up's GEMM took 1.7 ms a
        # layer that way, 1.45 ms into a reused buffer (SmolLM2, 512 tokens, one thread).
        y = self._buffer(f"output{which}", x.shape[0], sum(widths), dtype)
        for scale_set, tokens in groups.items():
            at = 0
            for index, width in zip(indices, widths, strict=True):
                self._dequantize(index, scale_set, weight[at : at + width])
                at += width
            if tokens is None:  # one scale set: every token, no gather
                return _linear(x.to(dtype), weight, bias, y)
            y[tokens] = F.linear(x[tokens].to(dtype), weight, bias)
        return y

    def _bias(self, indices: list[int], widths: list[int], dtype: torch.dtype) -> Tensor | None:
        """The projections' biases side by side (zeros where one has none), or None."""
        ints, biases = self.stack.weights.ints, self.stack.weights.biases
        if not any(ints[i, native.HAS_BIAS] for i in indices):
            return None
        parts = [
            torch.from_numpy(biases[ints[i, native.BIAS_AT] : ints[i, native.BIAS_AT] + width])
            if ints[i, native.HAS_BIAS] else torch.zeros(width)
            for i, width in zip(indices, widths, strict=True)
        ]  # fmt: skip
        return torch.cat(parts).to(dtype)

    def _dequantize(self, index: int, scale_set: int, out: Tensor) -> None:
        first, rest, offset = self._scales(index, scale_set)
        target = out.numpy() if out.dtype == torch.float32 else out.view(torch.int16).numpy()
        dequant.dequantize(
            self._codes(index), self.inverse, first, rest, offset,
            int(self.stack.weights.ints[index, native.GROUP_SIZE]),
            target.view(np.uint16) if out.dtype == torch.bfloat16 else target,
        )  # fmt: skip

    def _scales(
        self, index: int, scale_set: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Projection ``index``'s α₁ of ``scale_set``, other planes' scales and offset, as decode
        reads them, in the layers' ``(out, G)`` order."""
        ints = self.stack.weights.ints[index]
        out, bits = int(ints[native.OUT_FEATURES]), int(ints[native.BITS])
        dims = (int(ints[native.SCALE_DIM_1]), int(ints[native.SCALE_DIM_2]))
        sets = _kernel_floats(ints[native.FIRST_ADDRESS], (int(ints[native.N_SETS]), *dims))
        first = sets[scale_set if ints[native.BANKED] else 0]
        rest = _kernel_floats(ints[native.REST_ADDRESS], (bits - 1, *dims))
        if self.rows_inner:  # (G, padded out) -> (padded out, G)
            first, rest = first.T, rest.transpose(0, 2, 1)
        offset = None
        if ints[native.WITH_OFFSET]:
            offset = _kernel_floats(ints[native.OFFSET_ADDRESS], (out, int(ints[native.N_GROUPS])))
        return np.ascontiguousarray(first[:out]), np.ascontiguousarray(rest[:, :out]), offset

    def _codes(self, index: int) -> np.ndarray:
        """Projection ``index``'s codes in the kernel layout: a view of the stack's buffer."""
        ints = self.stack.weights.ints[index]
        shape = tuple(
            int(ints[c]) for c in (native.BITS, native.BLOCKS, native.N_BYTES, native.ROWS)
        )
        at = int(ints[native.CODES_AT])
        return self.stack.weights.codes[at : at + int(np.prod(shape))].reshape(shape)

    def _buffer(self, role: str, rows: int, columns: int, dtype: torch.dtype) -> Tensor:
        """A reused buffer per role (``weight``; ``output`` and the projections) and shape: a few
        per model (q·k·v, o, gate·up, down)."""
        key = (role, rows, columns, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(rows, columns, dtype=dtype)
        return self._buffers[key]


def _window_masks(prompts: Sequence[Prompt], windows: np.ndarray) -> dict[tuple[int, int], Tensor]:
    """For each (prompt index, sliding window) a windowed layer needs, the boolean mask
    ``(T, T)`` of the positions a token attends to: causal, and the last ``window`` only
    (transformers: kv > q - window). Prompts no longer than the window need none."""
    masks = {}
    for window in {int(w) for w in windows if w > 0}:
        for index, prompt in enumerate(prompts):
            if prompt.length > window:
                query = torch.arange(prompt.length)[:, None]
                key = torch.arange(prompt.length)[None, :]
                masks[index, window] = (key <= query) & (key > query - window)
    return masks


def _kernel_floats(address: int, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 view of ``shape`` at ``address`` (an array the stack keeps alive)."""
    if 0 in shape:
        return np.zeros(shape, np.float32)
    pointer = ctypes.cast(int(address), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(pointer, shape=shape)


def _bits(t: Tensor) -> np.ndarray:
    """A float32 tensor as its numpy array, a bfloat16 one as its bits (uint16; numpy has no
    bfloat16), for the numba kernels."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)`` written into ``out``."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)
