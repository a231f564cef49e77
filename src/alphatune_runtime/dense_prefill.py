"""Long prompts through dense GEMMs into the ``KVCache``: the loop, with or without torch.

The LUT kernel's cost grows with the tokens of a call; a GEMM's barely does, once its weight is
dense. So a batch of prompts runs through each block as a dense model would: every projection is
dequantized from the stack's own codes and scales into a reused buffer (``dequant``, the
projections that read one input stacked into one weight, once per adapter scale set in the
batch) and applied as one GEMM; the work between the GEMMs runs in a few numba calls per block
(``prefill_kernels``: norms, residual adds, heads split with rotary straight into the cache), and
attention runs per prompt. Decode continues from the cache.

What does the arithmetic is a ``DenseOps``: the GEMMs, the attention and the gated activation,
in the GEMMs' dtype. ``NumpyOps`` (here: float32 GEMMs through numpy's BLAS, the numba step's
attention) serves the torch-free runtime; ``alphatune.engine.prefill.TorchOps`` (bfloat16 GEMMs
on CPUs with native bfloat16, torch's flash attention) serves the engine.

``ALPHATUNE_PREFILL`` chooses: ``auto`` (the default: the dense path from ``MIN_TOKENS`` prompt
tokens per scale set where the GEMMs run in bfloat16, from ``MIN_FLOAT32_TOKENS`` in float32,
from ``MIN_NUMPY_TOKENS`` without torch, else the LUT kernel), ``bf16`` or ``float32`` (the
dense path for any prompts; float32 is exact up to summation order; without torch ``bf16``
runs float32), or ``lut`` (never).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from alphatune_runtime import dequant, layout, native
from alphatune_runtime import prefill_kernels as kernels
from alphatune_runtime.cache import KVCache
from alphatune_runtime.errors import ConfigError
from alphatune_runtime.memory import release_free_memory
from alphatune_runtime.stack import BlockStack

logger = logging.getLogger(__name__)

PREFILL_ENV = "ALPHATUNE_PREFILL"
CHOICES = ("auto", "bf16", "float32", "lut")
# Prompt tokens (per adapter scale set) from which ``auto`` takes the dense path in bfloat16:
# its fixed cost (dequantizing every layer) equals what the LUT kernel spends on ~60 prompt
# tokens. SmolLM2 3-bit, Xeon with AMX (``benchmarks/bench_prefill.py``,
# ``results/prefill_threshold.json``): 48 tokens 0.19 s LUT vs 0.24 s dense on 1 thread, 64
# tokens 0.26 vs 0.25 s, 96 tokens 0.38 vs 0.27 s; the same crossing on 2 threads.
MIN_TOKENS = 64
# The same crossing for torch's float32 GEMMs (a CPU without native bfloat16): SmolLM2 3-bit on
# the Xeon with MKL, oneDNN, OpenBLAS and numba held to AVX2 (``bench_prefill.py``'s usage,
# ``results/prefill_float32_avx2.json``): 64 tokens 0.25 s LUT vs 0.33 s dense on 1 thread,
# 128 tokens 0.51 vs 0.47 s, 512 tokens 2.35 vs 1.48 s; on 2 threads 64 tokens 0.15 vs 0.17 s,
# 128 tokens 0.31 vs 0.25 s, 512 tokens 1.45 vs 0.76 s.
MIN_FLOAT32_TOKENS = 128
# The torch-free runtime's crossing (``NumpyOps``: float32 GEMMs through numpy's BLAS on Python
# threads, the dequantization on one thread), later than torch's: ``bench_prefill.py --decoder
# runtime`` on this Xeon (``results/prefill_runtime.json``): 128 tokens 0.49 s LUT vs 0.33 s
# dense on 1 thread but 0.30 vs 0.31 s on 2, 256 tokens 1.04 vs 0.58 s and 0.62 vs 0.46 s; held
# to AVX2 as above (``results/prefill_runtime_avx2.json``): 256 tokens 1.07 vs 0.90 s on 1
# thread and 0.63 vs 0.63 s on 2, 512 tokens 2.33 vs 1.58 s and 1.38 vs 1.07 s.
MIN_NUMPY_TOKENS = 256
# Tokens per dense pass at most: a pass holds every token's activations at once (~30 KiB a
# token for SmolLM2), and each pass costs one more dequantization (~0.1 s), so a big batch goes
# in passes of whole prompts of about this many tokens (~60 MiB of activations).
MAX_PASS_TOKENS = 2048
ALIGNMENT = 64  # bytes: where every buffer of a pass starts (a cache line, an AVX-512 vector)
# Queries per score GEMM of ``NumpyOps.attention``: the scores of a tile (heads per key/value head
# x tile x prompt length, float32) stay ~3 MiB for SmolLM2 at 2,048 tokens.
ATTENTION_TILE = 128


def prefill_setting() -> str:
    """``ALPHATUNE_PREFILL`` as a choice (``auto`` if unset); a bad value is a ``ConfigError``."""
    setting = os.environ.get(PREFILL_ENV, "")
    choice = setting.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"{PREFILL_ENV}={setting!r}; choose one of {', '.join(CHOICES)}")
    return choice


def takes_dense_path(tokens: int, minimum: int) -> bool:
    """Whether ``tokens`` prompt tokens (per scale set) go through the dense path, as
    ``ALPHATUNE_PREFILL`` says; ``auto`` from ``minimum`` tokens (where its GEMMs beat the LUT
    kernel: ``MIN_TOKENS``, ``MIN_FLOAT32_TOKENS``, ``MIN_NUMPY_TOKENS``)."""
    choice = prefill_setting()
    if choice in ("bf16", "float32"):
        return True
    if choice == "lut":
        return False
    return tokens >= minimum


@dataclass(frozen=True)
class Prompt:
    """One prompt of a batch: its cache row, its length, its adapter scale set."""

    row: int
    length: int
    scale_set: int = 0


# Scale set -> the indices of its prompts' tokens (in the batch's flat token order); None: all.
ScaleGroups = dict[int, np.ndarray | None]


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


def batch_of(prompts: Sequence[np.ndarray], sets: np.ndarray, banked: bool) -> list[Prompt]:
    """Prompt p in cache row p with adapter ``sets[p]`` (0 where no projection is banked: every
    prompt reads the layers' own α)."""
    return [
        Prompt(row, len(ids), int(sets[row]) if banked else 0) for row, ids in enumerate(prompts)
    ]


def tokens_per_scale_set(batch: Sequence[Prompt]) -> int:
    """The prompt tokens that pay for one dequantization of every banked layer: each adapter's
    scale set costs one."""
    return sum(p.length for p in batch) // len({p.scale_set for p in batch})


def run_in_passes(
    run: Callable[[np.ndarray, list[Prompt]], np.ndarray],
    embed: Callable[[np.ndarray], np.ndarray],
    prompts: Sequence[np.ndarray],
    batch: Sequence[Prompt],
    most: int,
) -> np.ndarray:
    """``run(hidden, part)`` on each pass of whole prompts (``passes`` of at most ``most``
    tokens), ``hidden`` their embeddings (``embed``), and the passes' last hidden states joined.
    The prompts' activations and dequantized weights (~25-50 MiB for 512 SmolLM2 tokens) then go
    back to the system rather than staying resident through decode."""
    last = [
        run(embed(np.concatenate([prompts[p.row] for p in part])), part)
        for part in passes(batch, most)
    ]
    release_free_memory()
    return np.concatenate(last)


def _by_scale_set(prompts: Sequence[Prompt], spans: list[tuple[int, int]]) -> ScaleGroups:
    tokens: dict[int, list[int]] = {}
    for prompt, (begin, end) in zip(prompts, spans, strict=True):
        tokens.setdefault(prompt.scale_set, []).extend(range(begin, end))
    if len(tokens) == 1:
        return {next(iter(tokens)): None}
    return {s: np.asarray(t, np.int64) for s, t in tokens.items()}


class DenseOps(Protocol):
    """The arithmetic of a dense prefill, on numpy arrays (bfloat16 as uint16 bits)."""

    dtype: type  # of the GEMMs' operands: np.float32, or np.uint16 for bfloat16 bits

    def threads(self, count: int) -> contextlib.AbstractContextManager[Any]:
        """Every call inside runs on ``count`` threads (numba's and the GEMMs')."""

    def matmul(
        self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray
    ) -> None:
        """``out = x @ weight.T (+ bias)``; x ``(N, in)``, weight ``(out, in)``, bias float32."""

    def attention(
        self, cache: KVCache, layer: int, row: int, queries: np.ndarray, window: int,
        scale: float, out: np.ndarray,
    ) -> None:  # fmt: skip
        """One prompt's causal attention (its last ``window`` positions where > 0):
        ``queries (T, heads, d)`` float32 at positions ``0..T-1`` of cache row ``row``, whose
        keys and values are in ``cache`` already, into ``out (T, heads·d)``."""

    def activate(self, gate: np.ndarray, up: np.ndarray, gelu: bool) -> np.ndarray:
        """``act(gate) · up`` (SiLU, or GELU's tanh form), in place on gate where it can."""


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
        self._buffers: dict[tuple[str, int, int, type], np.ndarray] = {}

    def run(
        self,
        hidden: np.ndarray,
        prompts: Sequence[Prompt],
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int,
        ops: DenseOps,
        *,
        every_position: bool = False,
    ) -> np.ndarray:
        """The final-normed hidden states ``(P, H)`` of each prompt's last token (``(N, H)``, of
        every token, with ``every_position``).

        ``hidden (N, H)`` float32 is the prompts' embeddings one after another (overwritten: the
        residual stream); ``prompts`` says whose they are (``Prompt``: cache row, length,
        adapter scale set), positions ``0..length-1`` of each row. Every layer is dequantized
        once per scale set in the batch and applied to all of its prompts' tokens in one GEMM;
        attention runs per prompt.
        """
        spans = self._check(hidden, prompts, cache)
        shape, weights = self.stack.shape, self.stack.weights
        layer_rotary, windows = self.stack.layer_rotary, self.stack.layer_windows
        groups = _by_scale_set(prompts, spans)
        norms, qk_norms = weights.norms, weights.qk_norms
        form = shape.block
        mlp_norm, post_mlp = (
            native.SANDWICH_MLP_NORMS if form.sandwich_norms else native.LLAMA_MLP_NORMS
        )
        heads, kv_heads, head_dim = shape.n_heads, shape.n_kv_heads, shape.head_dim
        scale, eps = shape.attention_scale(), np.float32(shape.eps)
        tokens, dtype = hidden.shape[0], ops.dtype
        # Every layer's rotated queries, token-major (the numba step's attention reads them so;
        # heads_into_cache writes them through the (heads, N, d) view).
        queries = _aligned_empty((tokens, heads, head_dim), np.float32)
        attention = _aligned_empty((tokens, heads * head_dim), dtype)  # o_proj's input
        normed = _aligned_empty((tokens, hidden.shape[1]), dtype)  # the GEMMs' input after a norm
        with ops.threads(threads):
            for layer in range(shape.n_layers):
                base = 7 * layer
                kernels.rms_norm_into(hidden, norms[layer, 0], eps, normed)
                qkv = self._project(normed, base, (0, 1, 2), groups, ops)
                table = int(layer_rotary[layer])
                for prompt, (begin, end) in zip(prompts, spans, strict=True):
                    kernels.heads_into_cache(
                        qkv, begin, end, heads, kv_heads, qk_norms[layer, 0], qk_norms[layer, 1],
                        form.qk_norm, eps, rotary[0][table], rotary[1][table],
                        queries.transpose(1, 0, 2), cache.keys[layer, prompt.row],
                        cache.values[layer, prompt.row],
                    )  # fmt: skip
                    ops.attention(
                        cache, layer, prompt.row, queries[begin:end], int(windows[layer]), scale,
                        attention[begin:end],
                    )  # fmt: skip
                update = self._project(attention, base, (3,), groups, ops)
                sandwich = form.sandwich_norms
                kernels.add_update(hidden, update, sandwich, norms[layer, 1], eps)
                kernels.rms_norm_into(hidden, norms[layer, mlp_norm], eps, normed)
                gate_up = self._project(normed, base, (4, 5), groups, ops)
                half = gate_up.shape[1] // 2
                # In the GEMMs' dtype, as a bf16 model runs its MLP: the next GEMM's input.
                activated = ops.activate(gate_up[:, :half], gate_up[:, half:], form.gelu)
                update = self._project(activated, base, (6,), groups, ops)
                kernels.add_update(hidden, update, sandwich, norms[layer, post_mlp], eps)
            last = hidden if every_position else hidden[np.cumsum([p.length for p in prompts]) - 1]
            out = np.empty(last.shape, np.float32)
            kernels.rms_norm_into(np.ascontiguousarray(last), weights.final_norm, eps, out)
        self._buffers.clear()  # a few MiB, needed again only by the next long prompt
        return out

    def _check(
        self, hidden: np.ndarray, prompts: Sequence[Prompt], cache: KVCache
    ) -> list[tuple[int, int]]:
        """Each prompt's token span in ``hidden``, or a ``ConfigError`` saying what does not fit."""
        lengths = [p.length for p in prompts]
        if any(n < 1 for n in lengths):
            raise ConfigError(f"every prompt needs a token, got lengths {lengths}")
        ends = np.cumsum(lengths)
        if not prompts or ends[-1] != hidden.shape[0]:
            raise ConfigError(f"{hidden.shape[0]} embeddings for prompts of lengths {lengths}")
        if max(lengths) > cache.max_len:
            raise ConfigError(f"a prompt longer than the {cache.max_len}-position cache")
        if (
            hidden.dtype != np.float32
            or not hidden.flags.c_contiguous
            or not hidden.flags.writeable
        ):
            raise ConfigError("the embeddings must be a writable C-contiguous float32 array")
        return [(int(end) - n, int(end)) for n, end in zip(lengths, ends, strict=True)]

    def _project(
        self, x: np.ndarray, base: int, which: tuple[int, ...], groups: ScaleGroups, ops: DenseOps
    ) -> np.ndarray:
        """``x (N, in)`` through projections ``base + which`` (they read one input), their
        outputs side by side, ``(N, Σ out)`` in the GEMMs' dtype: per scale set, one GEMM of its
        tokens on the projections' stacked weight (one GEMM for all when none of them is banked).

        The result is a buffer reused by the same projections of every layer, valid until
        then: each is consumed before the next layer's.
        """
        ints = self.stack.weights.ints
        indices = [base + i for i in which]
        widths = [int(ints[i, native.OUT_FEATURES]) for i in indices]
        weight = self._buffer("weight", sum(widths), x.shape[1], ops.dtype)
        bias = self._bias(indices, widths)
        if not any(ints[i, native.BANKED] for i in indices):
            groups = {0: None}  # the layers' own scales for every token
        # A fresh multi-MiB output every GEMM cost page faults: gate·up's GEMM took 1.7 ms a
        # layer that way, 1.45 ms into a reused buffer (SmolLM2, 512 tokens, one thread).
        y = self._buffer(f"output{which}", x.shape[0], sum(widths), ops.dtype)
        for scale_set, tokens in groups.items():
            at = 0
            for index, width in zip(indices, widths, strict=True):
                self._dequantize(index, scale_set, weight[at : at + width])
                at += width
            if tokens is None:  # one scale set: every token, no gather
                ops.matmul(x, weight, bias, y)
                return y
            part = np.empty((len(tokens), y.shape[1]), ops.dtype)
            ops.matmul(np.ascontiguousarray(x[tokens]), weight, bias, part)
            y[tokens] = part
        return y

    def _bias(self, indices: list[int], widths: list[int]) -> np.ndarray | None:
        """The projections' float32 biases side by side (zeros where one has none), or None."""
        ints, biases = self.stack.weights.ints, self.stack.weights.biases
        if not any(ints[i, native.HAS_BIAS] for i in indices):
            return None
        parts = [
            biases[ints[i, native.BIAS_AT] : ints[i, native.BIAS_AT] + width]
            if ints[i, native.HAS_BIAS] else np.zeros(width, np.float32)
            for i, width in zip(indices, widths, strict=True)
        ]  # fmt: skip
        return np.concatenate(parts).astype(np.float32)

    def _dequantize(self, index: int, scale_set: int, out: np.ndarray) -> None:
        first, rest, offset = self._scales(index, scale_set)
        dequant.dequantize(
            self._codes(index), self.inverse, first, rest, offset,
            int(self.stack.weights.ints[index, native.GROUP_SIZE]), out,
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

    def _buffer(self, role: str, rows: int, columns: int, dtype: type) -> np.ndarray:
        """A reused buffer per role (``weight``; ``output`` and the projections) and shape: a few
        per model (q·k·v, o, gate·up, down)."""
        key = (role, rows, columns, dtype)
        if key not in self._buffers:
            self._buffers[key] = _aligned_empty((rows, columns), dtype)
        return self._buffers[key]


def _aligned_empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """``np.empty`` starting on a 64-byte boundary, as torch's allocator places a tensor: oneDNN's
    bfloat16 GEMM ran ~15% slower on numpy's 16-byte-aligned buffers (SmolLM2, 512 tokens)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % ALIGNMENT
    return raw[skip : skip + size].view(dtype).reshape(shape)


def _kernel_floats(address: int, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 view of ``shape`` at ``address`` (an array the stack keeps alive)."""
    if 0 in shape:
        return np.zeros(shape, np.float32)
    pointer = ctypes.cast(int(address), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(pointer, shape=shape)


class NumpyOps:
    """``DenseOps`` without torch: float32 GEMMs and attention through numpy's BLAS, the gated
    activation in numba.

    The GEMMs and the attention are split over Python threads (numpy lets go of the GIL inside
    its loops), with numpy's OpenBLAS and numba each held to one thread: their own pools spin
    after each call and took the cores from each other. SmolLM2, 512 tokens, two threads: with
    OpenBLAS on two threads the dequantization between its GEMMs took 1.0 s against 0.1 s on
    one; with numba's OpenMP threads spinning after its kernels the GEMMs ran no faster than on
    one thread (0.6 s against 0.4 s once they waited passively).
    """

    dtype = np.float32

    def __init__(self) -> None:
        self.count = 1

    @contextlib.contextmanager
    def threads(self, count: int) -> Iterator[None]:
        from numba import get_num_threads, set_num_threads

        before, self.count = get_num_threads(), count
        set_num_threads(1)  # numba's kernels here are small next to the GEMMs: see above
        try:
            with _blas_threads(1):
                yield
        finally:
            set_num_threads(before)

    def _each(self, work: Any, items: Sequence[Any]) -> None:
        """``work(item)`` for every item, on ``count`` threads."""
        if self.count == 1 or len(items) == 1:
            for item in items:
                work(item)
            return
        # Every item finishes (none still writing into a buffer) before an error is raised.
        pending = [_pool().submit(work, item) for item in items]
        errors = [e for e in (f.exception() for f in pending) if e is not None]
        if errors:
            raise errors[0]

    def matmul(
        self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray
    ) -> None:
        rows = -(-x.shape[0] // self.count)

        def part(begin: int) -> None:
            end = begin + rows
            np.matmul(x[begin:end], weight.T, out=out[begin:end])
            if bias is not None:
                out[begin:end] += bias

        self._each(part, range(0, x.shape[0], rows))

    def attention(
        self, cache: KVCache, layer: int, row: int, queries: np.ndarray, window: int,
        scale: float, out: np.ndarray,
    ) -> None:  # fmt: skip
        """Per key/value head and tile of ``ATTENTION_TILE`` queries: the scores as one GEMM
        over the keys the tile can see, masked (causal, the window), softmax, one GEMM with the
        values. float32 throughout, as the numba step's ``attend`` (summation order aside)."""
        length, heads, head_dim = queries.shape
        kv_heads = cache.keys.shape[2]
        group = heads // kv_heads
        keys, values = cache.keys[layer, row], cache.values[layer, row]
        attended = out.reshape(length, heads, head_dim)

        def tile(item: tuple[int, int]) -> None:
            kv, begin = item
            end = min(length, begin + ATTENTION_TILE)
            first = max(0, begin - window + 1) if window > 0 else 0
            these = slice(kv * group, (kv + 1) * group)
            q = np.ascontiguousarray(queries[begin:end, these].transpose(1, 0, 2))  # (g, t, d)
            scores = np.matmul(q, keys[kv, first:end].T)  # (g, t, k)
            scores *= np.float32(scale)
            position = np.arange(begin, end)[:, None]
            key = np.arange(first, end)[None, :]
            hidden = key > position
            if window > 0:
                hidden |= key <= position - window
            np.copyto(scores, np.float32(-np.inf), where=hidden)
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            attended[begin:end, these] = np.matmul(scores, values[kv, first:end]).transpose(1, 0, 2)

        self._each(
            tile, [(kv, b) for kv in range(kv_heads) for b in range(0, length, ATTENTION_TILE)]
        )

    def activate(self, gate: np.ndarray, up: np.ndarray, gelu: bool) -> np.ndarray:
        native.gated_activation(gate, up, gelu)
        return gate


@functools.cache
def _pool() -> Any:
    """The threads ``NumpyOps`` splits its work over (one per core numba may use)."""
    from concurrent.futures import ThreadPoolExecutor

    from numba import config

    return ThreadPoolExecutor(max_workers=int(config.NUMBA_NUM_THREADS))


# A forked child inherits the pool without its threads (and would wait on them forever): it
# starts its own.
os.register_at_fork(after_in_child=_pool.cache_clear)


@contextlib.contextmanager
def _blas_threads(count: int) -> Iterator[None]:
    """numpy's OpenBLAS held to ``count`` threads inside (its default is every core), where its
    library exposes the setting; otherwise unchanged (logged once). The setting is the
    process's: two prefills at once on two threads of one process share it."""
    setter, getter = _openblas_thread_calls()
    if setter is None or getter is None:
        yield
        return
    before = getter()
    setter(count)
    try:
        yield
    finally:
        setter(before)


@functools.cache
def _openblas_thread_calls() -> tuple[Any, Any]:
    """The set / get thread-count calls of the OpenBLAS numpy's wheel bundles, or (None, None)."""
    where = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")
    for path in sorted(glob.glob(where)):
        library = ctypes.CDLL(path)  # already loaded by numpy: the same handle
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    setter.argtypes, getter.restype = [ctypes.c_int], ctypes.c_int
                    return setter, getter
    logger.info("numpy's BLAS thread count is not settable here: dense prefill GEMMs use its own")
    return None, None
