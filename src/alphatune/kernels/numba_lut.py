"""LUT-GEMV for BCQ layers on CPU (numba), in the style of LUT-GEMM and T-MAC.

Same signature as ``alphatune.kernels.reference.bcq_matmul_reference``::

    bcq_matmul_lut(x, packed, alpha, offset, group_size, in_features) -> y

Algorithm (LUT-GEMM, Park et al. 2022; T-MAC, Wei et al. 2024). For every token and every chunk of
8 activations ``x[8k .. 8k+7]`` build the table of all 256 signed partial sums

    table[k, m] = Σ_j (bit j of m ? +x[8k+j] : -x[8k+j])

so that one packed code byte ``m`` (layout: ``alphatune.packing``) selects the product of 8 codes
with 8 activations in one lookup. Then, for every output row, bit plane and input group,
``y[r] += alpha[i, r, k] · Σ_bytes table[byte, packed[i, r, byte]]`` and, with an offset,
``y[r] += offset[r, k] · Σ x[group k]``. A lookup costs one load and one add, for 8 weights.

Tables are built incrementally: ``table[m] = table[m - 2^j] + 2·x_j`` for ``2^j <= m < 2^(j+1)``,
starting from ``table[0] = -Σ x_j``. Activations past ``in_features`` (the padding of a partial last
byte) count as 0, so the padding bits (0, i.e. "-1") contribute nothing.

Two code paths, both exact up to float32 summation order:

- **words**: ``ceil(in/8) % 8 == 0`` (e.g. in_features % 64 == 0) and groups of a multiple of 64
  inputs (or one group per row). Code bytes are read 8 at a time as ``uint64``.
- **bytes**: any ``in_features``, groups of a multiple of 8 inputs (or one group per row).

Rows are processed in blocks of ``_ROW_BLOCK``; each token's table is swept once per block, so a
block's codes are read from memory once for all tokens. Row blocks are the unit of parallel work.

Groups that split a code byte (``group_size % 8 != 0`` with more than one group) are not supported:
the kernel raises ``KernelUnavailableError`` and the dispatcher falls back to the reference.

Speed, measured on the development machine (2 vCPU AMD EPYC Zen 4, shared): the lookups run from
L2 (the tables are ``ceil(in/8)`` KiB per token) and bound the speed, not the bytes of codes read.
Tiling the input so that tables stay in L1 was 2x faster on hugepage-backed numpy buffers but
slower on ordinary torch tensors (strided code reads), so rows are streamed whole. 4-bit tables
(T-MAC's 16 entries, one cache line each) need twice the lookups and were 1.3x slower.

Everything is computed in float32; the result comes back in x's dtype. No autograd: inputs are
detached. Tokens are processed in chunks of ``_MAX_TOKENS`` so table memory stays bounded
(``_MAX_TOKENS · ceil(in/8) KiB``); the cost grows linearly with tokens, so the kernel is meant
for decode (one or a few tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alphatune.errors import ConfigError, KernelUnavailableError
from alphatune.packing import packed_width

logger = logging.getLogger(__name__)

try:
    import numba
    from numba import njit, prange

    _NUMBA_IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    numba = None  # type: ignore[assignment]
    _NUMBA_IMPORT_ERROR = exc
    prange = range  # type: ignore[assignment,misc]

    def njit(*args: Any, **kwargs: Any) -> Callable[..., Any]:  # type: ignore[no-redef]
        """Stand-in so the module imports without numba; the kernel refuses to run."""
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda function: function


_ROW_BLOCK = 128  # rows per work item: their codes stay in L2 while every token's table passes
_MAX_TOKENS = 8  # tokens per kernel launch; bounds table memory
_MIN_PARALLEL_LOOKUPS = 1 << 18  # below this (~0.1 ms of work) one thread beats a thread launch

_U8 = np.uint64(8)
_U16 = np.uint64(16)
_U24 = np.uint64(24)
_U32 = np.uint64(32)
_U40 = np.uint64(40)
_U48 = np.uint64(48)
_U56 = np.uint64(56)
_LOW_BYTE = np.uint64(255)
_TABLE = np.uint64(256)  # entries per code byte
_WORD_TABLES = np.uint64(2048)  # entries per code word (8 bytes)


def numba_available() -> bool:
    """True when numba imported, i.e. ``bcq_matmul_lut`` can run."""
    return numba is not None


# ----------------------------------------------------------------------------- numba kernels
# Index arithmetic is unsigned on purpose: numba adds a negative-index wraparound check to every
# signed index, which costs more than the lookup itself.


@njit(fastmath=False, cache=True)
def _build_tables(x, tables, group_sums, group_size, with_sums):  # pragma: no cover - numba
    """tables (T, ceil(in/8)*256) <- signed partial sums; group_sums (T, G) <- Σ x per group.

    Serial: 255 adds per 8 activations, a few percent of the lookups that follow.
    """
    n_tokens, in_features = x.shape
    n_bytes = tables.shape[1] // 256
    for t in range(n_tokens):
        for k in range(n_bytes):
            first = 8 * k
            base = 256 * k
            total = np.float32(0.0)
            for j in range(8):
                if first + j < in_features:
                    total -= x[t, first + j]
            tables[t, base] = total
            step = 1
            for j in range(8):
                # A missing activation (partial last byte) is 0: its padding bit adds nothing.
                twice = np.float32(0.0)
                if first + j < in_features:
                    twice = np.float32(2.0) * x[t, first + j]
                for m in range(step):
                    tables[t, base + step + m] = tables[t, base + m] + twice
                step *= 2
        if with_sums:
            for g in range(group_sums.shape[1]):
                s = np.float32(0.0)
                for j in range(g * group_size, (g + 1) * group_size):
                    s += x[t, j]
                group_sums[t, g] = s


@njit(inline="always")
def _lookup_word(table, base, word, s0, s1, s2, s3):  # pragma: no cover - numba
    """Add the 8 lookups of one code word (bytes k..k+7, table offset ``base``) to 4 sums."""
    s0 += table[base + (word & _LOW_BYTE)]
    s1 += table[base + _TABLE + ((word >> _U8) & _LOW_BYTE)]
    s2 += table[base + np.uint64(512) + ((word >> _U16) & _LOW_BYTE)]
    s3 += table[base + np.uint64(768) + ((word >> _U24) & _LOW_BYTE)]
    s0 += table[base + np.uint64(1024) + ((word >> _U32) & _LOW_BYTE)]
    s1 += table[base + np.uint64(1280) + ((word >> _U40) & _LOW_BYTE)]
    s2 += table[base + np.uint64(1536) + ((word >> _U48) & _LOW_BYTE)]
    s3 += table[base + np.uint64(1792) + (word >> _U56)]
    return s0, s1, s2, s3


@njit(fastmath=False, cache=True)
def _words_block(
    tables, words, alpha, offset, group_sums, with_offset, words_per_group, r0, r1, y
):  # pragma: no cover - numba
    """Rows r0..r1 of y (T, out) from codes read as uint64 words (q, out, nw).

    Every token's table is swept once per row block, so a block's codes (L2) are read from
    memory once for all tokens.
    """
    n_tokens = tables.shape[0]
    bits = words.shape[0]
    n_groups = alpha.shape[2]
    for t in range(n_tokens):
        table = tables[t]
        for r in range(r0, r1):
            a = np.float32(0.0)
            for g in range(n_groups):
                start = g * words_per_group
                end = start + words_per_group
                base0 = np.uint64(start) * _WORD_TABLES
                for i in range(bits):
                    z = np.float32(0.0)
                    s0, s1, s2, s3 = z, z, z, z
                    base = base0
                    if words_per_group == 1:
                        s0, s1, s2, s3 = _lookup_word(
                            table, base, words[i, r, start], s0, s1, s2, s3
                        )
                        a += alpha[i, r, g] * ((s0 + s1) + (s2 + s3))
                        continue
                    u0, u1, u2, u3 = z, z, z, z
                    w = start
                    # Two words per step into 8 independent sums: the adds' latency hides.
                    while w + 2 <= end:
                        s0, s1, s2, s3 = _lookup_word(table, base, words[i, r, w], s0, s1, s2, s3)
                        u0, u1, u2, u3 = _lookup_word(
                            table, base + _WORD_TABLES, words[i, r, w + 1], u0, u1, u2, u3
                        )
                        base += _WORD_TABLES + _WORD_TABLES
                        w += 2
                    if w < end:
                        s0, s1, s2, s3 = _lookup_word(table, base, words[i, r, w], s0, s1, s2, s3)
                    a += alpha[i, r, g] * (((s0 + u0) + (s1 + u1)) + ((s2 + u2) + (s3 + u3)))
            if with_offset:
                for g in range(n_groups):
                    a += offset[r, g] * group_sums[t, g]
            y[t, r] = a


@njit(fastmath=False, cache=True)
def _bytes_block(
    tables, packed, alpha, offset, group_sums, with_offset, bytes_per_group, r0, r1, y
):  # pragma: no cover - numba
    """Rows r0..r1 of y (T, out) from codes read byte by byte (q, out, nb); any in_features."""
    n_tokens = tables.shape[0]
    bits, _, n_bytes = packed.shape
    n_groups = alpha.shape[2]
    for t in range(n_tokens):
        table = tables[t]
        for r in range(r0, r1):
            a = np.float32(0.0)
            for g in range(n_groups):
                k0 = g * bytes_per_group
                k1 = min(n_bytes, k0 + bytes_per_group)
                for i in range(bits):
                    z = np.float32(0.0)
                    s0, s1, s2, s3 = z, z, z, z
                    k = k0
                    base = np.uint64(k0) * _TABLE
                    while k + 4 <= k1:
                        s0 += table[base + np.uint64(packed[i, r, k])]
                        s1 += table[base + _TABLE + np.uint64(packed[i, r, k + 1])]
                        s2 += table[base + np.uint64(512) + np.uint64(packed[i, r, k + 2])]
                        s3 += table[base + np.uint64(768) + np.uint64(packed[i, r, k + 3])]
                        base += np.uint64(1024)
                        k += 4
                    while k < k1:
                        s0 += table[base + np.uint64(packed[i, r, k])]
                        base += _TABLE
                        k += 1
                    a += alpha[i, r, g] * ((s0 + s1) + (s2 + s3))
            if with_offset:
                for g in range(n_groups):
                    a += offset[r, g] * group_sums[t, g]
            y[t, r] = a


# Two drivers per path: numba's OpenMP pool costs milliseconds per launch on a busy machine, so
# one thread runs a plain loop and never starts it.


@njit(fastmath=False, cache=True)
def _gemv_words_serial(
    tables, words, alpha, offset, group_sums, with_offset, words_per_group, y
):  # pragma: no cover - numba
    out = words.shape[1]
    for r0 in range(0, out, _ROW_BLOCK):
        _words_block(
            tables,
            words,
            alpha,
            offset,
            group_sums,
            with_offset,
            words_per_group,
            r0,
            min(out, r0 + _ROW_BLOCK),
            y,
        )


@njit(parallel=True, fastmath=False, cache=True)
def _gemv_words_parallel(
    tables, words, alpha, offset, group_sums, with_offset, words_per_group, y
):  # pragma: no cover - numba
    out = words.shape[1]
    n_blocks = (out + _ROW_BLOCK - 1) // _ROW_BLOCK
    for block in prange(n_blocks):
        r0 = block * _ROW_BLOCK
        _words_block(
            tables,
            words,
            alpha,
            offset,
            group_sums,
            with_offset,
            words_per_group,
            r0,
            min(out, r0 + _ROW_BLOCK),
            y,
        )


@njit(fastmath=False, cache=True)
def _gemv_bytes_serial(
    tables, packed, alpha, offset, group_sums, with_offset, bytes_per_group, y
):  # pragma: no cover - numba
    _bytes_block(
        tables,
        packed,
        alpha,
        offset,
        group_sums,
        with_offset,
        bytes_per_group,
        0,
        packed.shape[1],
        y,
    )


@njit(parallel=True, fastmath=False, cache=True)
def _gemv_bytes_parallel(
    tables, packed, alpha, offset, group_sums, with_offset, bytes_per_group, y
):  # pragma: no cover - numba
    out = packed.shape[1]
    n_blocks = (out + _ROW_BLOCK - 1) // _ROW_BLOCK
    for block in prange(n_blocks):
        r0 = block * _ROW_BLOCK
        _bytes_block(
            tables,
            packed,
            alpha,
            offset,
            group_sums,
            with_offset,
            bytes_per_group,
            r0,
            min(out, r0 + _ROW_BLOCK),
            y,
        )


# ----------------------------------------------------------------------------- python wrapper


def _threads_for(lookups: int) -> int:
    """Threads for one launch: torch's setting, capped by numba's pool; 1 for small layers."""
    if lookups < _MIN_PARALLEL_LOOKUPS:
        return 1
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _require_numba() -> None:
    if numba is None:
        raise KernelUnavailableError(
            "the numba LUT kernel needs numba, which failed to import; "
            "install it with `pip install numba` (or `pip install alphatune[fast]`)"
        ) from _NUMBA_IMPORT_ERROR


def _check_inputs(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> None:
    tensors = [x, packed, alpha] + ([offset] if offset is not None else [])
    if any(t.device.type != "cpu" for t in tensors):
        raise KernelUnavailableError(
            "the numba LUT kernel runs on CPU tensors only; "
            f"got devices {sorted({str(t.device) for t in tensors})}: use the reference kernel"
        )
    if x.shape[-1] != in_features:
        raise ConfigError(f"x has {x.shape[-1]} input features, the layer expects {in_features}")
    if packed.dtype != torch.uint8 or packed.dim() != 3:
        raise ConfigError(
            f"packed codes must be uint8 (q, out, ceil(in/8)), got {packed.dtype} {tuple(packed.shape)}"
        )
    bits, out, n_bytes = packed.shape
    if n_bytes != packed_width(in_features):
        raise ConfigError(
            f"packed width {n_bytes} does not match in_features={in_features} "
            f"(expected {packed_width(in_features)} bytes per row)"
        )
    if group_size < 1 or in_features % group_size:
        raise ConfigError(f"group_size {group_size} must divide in_features={in_features}")
    n_groups = in_features // group_size
    if tuple(alpha.shape) != (bits, out, n_groups):
        raise ConfigError(
            f"alpha must have shape (q, out, in/group_size) = {(bits, out, n_groups)}, "
            f"got {tuple(alpha.shape)}"
        )
    if offset is not None and tuple(offset.shape) != (out, n_groups):
        raise ConfigError(
            f"offset must have shape (out, in/group_size) = {(out, n_groups)}, got {tuple(offset.shape)}"
        )
    if n_groups > 1 and group_size % 8:
        raise KernelUnavailableError(
            f"the LUT kernel needs groups that do not split a code byte: group_size must be a "
            f"multiple of 8 (or equal in_features={in_features}), got {group_size}; "
            "use the reference kernel for this layer"
        )


def supports(group_size: int, in_features: int) -> bool:
    """Whether the LUT kernel handles this layer layout (groups must not split a code byte)."""
    return group_size == in_features or group_size % 8 == 0


def _as_f32(t: Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def bcq_matmul_lut(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> Tensor:
    """BCQ matmul by table lookup: ``y = Σ_i Σ_k alpha[i,:,k] ⊙ (B_i x)_k (+ offset[:,k]·Σ x_k)``.

    Same contract as ``bcq_matmul_reference``; CPU only, no autograd, float32 arithmetic. Meant
    for decode-sized inputs (1..8 tokens); larger inputs work but are processed 8 tokens at a time.
    Uses ``torch.get_num_threads()`` threads (capped by numba's thread pool).

    Args:
        x: ``(..., in_features)`` float activations.
        packed: ``(q, out, ceil(in_features/8))`` uint8 codes (layout: ``alphatune.packing``).
        alpha: ``(q, out, in_features // group_size)`` float scales.
        offset: ``(out, in_features // group_size)`` float, or ``None``.
        group_size: inputs per scale group; a multiple of 8, or ``in_features`` (one group).
        in_features: number of inputs (the packed rows may carry padding bits).

    Returns:
        ``(..., out)`` in x's dtype (no bias).

    Raises:
        KernelUnavailableError: numba is missing, a tensor is not on CPU, or groups split a byte.
        ConfigError: shapes or dtypes are inconsistent.

    Example::

        >>> import torch
        >>> from alphatune.bcq import fit_greedy
        >>> from alphatune.packing import pack_codes
        >>> fit = fit_greedy(torch.randn(16, 64), bits=3)
        >>> y = bcq_matmul_lut(torch.randn(1, 64), pack_codes(fit.codes), fit.alpha, None, 64, 64)
        >>> y.shape
        torch.Size([1, 16])
    """
    _require_numba()
    _check_inputs(x, packed, alpha, offset, group_size, in_features)
    bits, out, n_bytes = packed.shape
    n_groups = in_features // group_size
    lead = x.shape[:-1]
    flat = x.detach().reshape(-1, in_features).to(torch.float32).contiguous()  # (T, in)
    n_tokens = flat.shape[0]
    y = torch.empty(n_tokens, out, dtype=torch.float32)
    if n_tokens == 0 or out == 0:
        return y.reshape(*lead, out).to(x.dtype)
    if in_features == 0:
        return y.zero_().reshape(*lead, out).to(x.dtype)

    codes = packed.detach().contiguous().numpy()
    alpha_np = _as_f32(alpha)
    with_offset = offset is not None
    # A dummy keeps one compiled signature for both cases (numba compiles per argument type).
    offset_np = _as_f32(offset) if offset is not None else np.zeros((1, 1), np.float32)
    use_words = n_bytes % 8 == 0 and (n_groups == 1 or group_size % 64 == 0)
    bytes_per_group = n_bytes if n_groups == 1 else group_size // 8

    chunk = min(n_tokens, _MAX_TOKENS)
    tables = np.empty((chunk, n_bytes * 256), np.float32)
    group_sums = np.zeros((chunk, n_groups if with_offset else 1), np.float32)
    x_np = flat.numpy()
    y_np = y.numpy()
    words = codes.view(np.uint64) if use_words else None
    threads = _threads_for(bits * out * n_bytes * chunk)
    torch_threads = torch.get_num_threads()
    if threads > 1:
        numba.set_num_threads(threads)
    try:
        for start in range(0, n_tokens, chunk):
            stop = min(n_tokens, start + chunk)
            used = stop - start
            x_chunk, tables_chunk, sums_chunk = x_np[start:stop], tables[:used], group_sums[:used]
            _build_tables(x_chunk, tables_chunk, sums_chunk, group_size, with_offset)
            if words is not None:
                gemv = _gemv_words_parallel if threads > 1 else _gemv_words_serial
                gemv(
                    tables_chunk,
                    words,
                    alpha_np,
                    offset_np,
                    sums_chunk,
                    with_offset,
                    bytes_per_group // 8,
                    y_np[start:stop],
                )
            else:
                gemv = _gemv_bytes_parallel if threads > 1 else _gemv_bytes_serial
                gemv(
                    tables_chunk,
                    codes,
                    alpha_np,
                    offset_np,
                    sums_chunk,
                    with_offset,
                    bytes_per_group,
                    y_np[start:stop],
                )
    finally:
        if torch.get_num_threads() != torch_threads:
            # Starting numba's OpenMP pool resets the process-wide OpenMP thread count that
            # torch reads; give torch its setting back.
            torch.set_num_threads(torch_threads)
    return y.reshape(*lead, out).to(x.dtype)
