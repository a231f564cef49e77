"""The numba step: a Llama or Gemma-3 block stack over a flat list of tokens, in one native call.

``forward_tokens`` runs every block for ``N`` tokens, each with its own cache row, position and
scale set (adapter), and returns the final-normed hidden states. Decode passes one token per
batch row; prefill passes chunks of prompt tokens (several rows mixed). Each block writes the
chunk's keys and values into the cache before any token attends, and a token attends to its
row's positions ``0..position`` (a sliding-window layer: the last ``window`` of them): that is
the causal mask, with no padding anywhere.

The seven projections of a block call the LUT kernel's njit code directly, so no Python runs
between layers: the per-token framework cost of the transformers path (module calls, dispatch,
tensor <-> numpy) is gone. Projections that read the same input (``SHARED_INPUTS``: q, k and v;
gate and up) share its lookup tables, built once, and run their row blocks in one parallel
region, split evenly over the threads (AVX2; the AVX-512 kernel runs each projection whole,
through its ``decode_native``). Which kernel, and which AVX2 tables, are compiled in is decided
at typing time by the dtype of ``kernel_tag`` (``KERNEL_TAGS``), so an AVX2-only CPU never
compiles the AVX-512 loop, and the step stays cacheable on disk (numba does not cache functions
that take other functions as arguments).

Arithmetic is float32 like the transformers forward; only summation orders differ (the loops
below use ``fastmath`` reassociation so that the dot products vectorise).
"""

from __future__ import annotations

import numpy as np

try:
    from numba import carray, njit, prange, types
    from numba.extending import intrinsic, overload

    _IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    _IMPORT_ERROR = exc

# Kernel name -> the kernel_tag dtype that selects its code at typing time: the AVX2 kernel by
# its tables (float32, int16 levels split into bytes, int8 levels), or the AVX-512 kernel.
KERNEL_TAGS = {
    "avx2": np.float32,
    "avx2-int16": np.uint8,
    "avx2-int8": np.int8,
    "avx512": np.int16,
}
_TAG_TABLE_BITS = {"float32": 0, "uint8": 16, "int8": 8}  # AVX2 tag dtype -> its table_bits
# Code bits × tokens from which a group of projections sharing an input runs on the threads
# (AVX2: one parallel region per group, its row blocks split evenly). Measured on SmolLM2 3-bit,
# 2 threads, one token: every group parallel (o alone is 576·576·3 ≈ 1M) gave the fastest
# blocks; the kernel's own threshold for a lone layer is 2M.
MIN_PARALLEL_GROUP_WORK = 1 << 19

# Projections of a block, in the order the step reads them (index within a block's 7).
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# The projections that read one input, as (first index, count) in ``PROJECTIONS``: q, k and v
# read the normed hidden state, o the attention, gate and up the normed residual, down the
# gated MLP activations. ``forward_tokens`` builds each input's tables once for its group.
SHARED_INPUTS = ((0, 3), (3, 1), (4, 2), (6, 1))
# Where a block's norms are in ``norms[layer]``: (pre-MLP, post-MLP) slots. Llama's block has two
# norms, (input, pre-MLP); with sandwich norms (Gemma) four: (input, post-attention, pre-MLP,
# post-MLP). Slot 0 is always the input norm, slot 1 the post-attention one when there is one;
# a post-MLP slot is read only with sandwich norms.
LLAMA_MLP_NORMS = (1, 0)
SANDWICH_MLP_NORMS = (2, 3)

# Columns of the per-projection integer table (``ints``): the kernel's scalars, then where each
# operand is. Codes and biases start at an offset in the engine's flat buffers; the scales and the
# offset are at a memory address (``*_ADDRESS``), as the kernel may read them where the layer keeps
# them (``layout.scales_in_layer_order``), with the last two dimensions of the scale arrays
# (``SCALE_DIM_*``: the kernel's layout). Offsets and addresses, not numba typed lists: a typed
# list costs seconds of compilation in every new process, and a tuple of arrays one compilation
# per model depth.
(
    GROUP_SIZE,
    N_GROUPS,
    BYTES_PER_GROUP,
    WITH_OFFSET,
    OUT_FEATURES,
    BANKED,
    HAS_BIAS,
    WORK,
    BITS,
    BLOCKS,
    N_BYTES,
    ROWS,
    N_SETS,
    SCALE_DIM_1,  # the scale arrays' last two dimensions (the kernel's layout)
    SCALE_DIM_2,
    CODES_AT,
    FIRST_ADDRESS,
    REST_ADDRESS,
    OFFSET_ADDRESS,
    BIAS_AT,
) = range(20)
INT_COLUMNS = 20

# Reassociation lets LLVM vectorise the reductions; no assumption about NaN or inf is made.
_FAST = {"reassoc", "contract", "arcp"}


def available() -> bool:
    return _IMPORT_ERROR is None


if _IMPORT_ERROR is None:
    from alphatune_runtime import avx2, avx512
    from alphatune_runtime.lut import add_offset, build_tables

    fill_tables = avx2.fill_tables_native
    row_blocks = avx2.row_blocks_native

    def _lut_matvec(
        tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
        bytes_per_group, threads,
    ):  # pragma: no cover - replaced by the overload  # fmt: skip
        raise NotImplementedError

    @overload(_lut_matvec)
    def _lut_matvec_overload(
        tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
        bytes_per_group, threads,
    ):  # fmt: skip
        """One layer through the tag's kernel (``decode_native``), tables and all, on ``threads``
        of numba's threads (1: serial; the caller sets numba's count)."""
        if tag.dtype == types.int16:
            decode512 = avx512.decode_native

            def call512(
                tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
                bytes_per_group, threads,
            ):  # fmt: skip
                return decode512(
                    x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
                    bytes_per_group, threads > 1,  # AVX-512 takes a flag: numba's count is set
                )  # fmt: skip

            return call512
        decode2 = avx2.decode_native
        table_bits = _TAG_TABLE_BITS[str(tag.dtype)]

        def call2(
            tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
            bytes_per_group, threads,
        ):  # fmt: skip
            return decode2(
                x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
                bytes_per_group, table_bits, threads,
            )  # fmt: skip

        return call2

    def _tables(
        tag, x, group_size, n_groups, bytes_per_group, n_bytes, with_sums, threads
    ):  # pragma: no cover - replaced by the overload  # fmt: skip
        raise NotImplementedError

    @overload(_tables)
    def _tables_overload(
        tag, x, group_size, n_groups, bytes_per_group, n_bytes, with_sums, threads
    ):  # fmt: skip
        """``(tables, chunk_scales, group_sums)`` of x for the AVX2 kernel's tables (the tag's
        dtype: float32 tables, int16 levels split into bytes, or int8 levels); ``threads`` > 1
        splits integer tables' tokens over numba's threads."""
        if tag.dtype == types.float32:

            def float_tables(
                tag, x, group_size, n_groups, bytes_per_group, n_bytes, with_sums, threads
            ):  # fmt: skip
                tables = np.empty((x.shape[0], 32 * n_bytes), np.float32)
                group_sums = np.empty((x.shape[0], n_groups), np.float32)
                build_tables(x, group_size, tables, group_sums, with_sums)
                return tables, np.zeros((1, 1), np.float32), group_sums

            return float_tables
        split = tag.dtype == types.uint8
        width, levels_dtype = (64, np.uint8) if split else (32, np.int8)

        def integer_tables(
            tag, x, group_size, n_groups, bytes_per_group, n_bytes, with_sums, threads
        ):  # fmt: skip
            levels = np.empty((x.shape[0], width * n_bytes), levels_dtype)
            chunk_scales, group_sums = fill_tables(
                x, group_size, n_groups, bytes_per_group, split, levels, with_sums, threads
            )
            return levels, chunk_scales, group_sums

        return integer_tables

    @intrinsic
    def _float32_pointer(typingctx, address):  # pragma: no cover - numba
        """The float32 array at memory ``address`` (an int64 from ``ndarray.ctypes.data``)."""
        sig = types.CPointer(types.float32)(address)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    @njit(cache=True, fastmath=_FAST)
    def rms_norm(x, weight, eps, out):  # pragma: no cover - numba
        """out[n] = x[n] / sqrt(mean(x[n]²) + eps) · weight, float32 (LlamaRMSNorm; Gemma's with
        its 1 + w folded into weight)."""
        n_tokens, width = x.shape
        for n in range(n_tokens):
            total = np.float32(0.0)
            for i in range(width):
                total += x[n, i] * x[n, i]
            inverse = np.float32(1.0) / np.sqrt(total / np.float32(width) + eps)
            for i in range(width):
                out[n, i] = weight[i] * (x[n, i] * inverse)

    @njit(cache=True, fastmath=_FAST)
    def head_norm(x, n_heads, head_dim, weight, eps):  # pragma: no cover - numba
        """In place on x (N, heads·d): ``rms_norm`` of every head's d values (Gemma-3's query
        and key norms)."""
        for n in range(x.shape[0]):
            for h in range(n_heads):
                base = h * head_dim
                total = np.float32(0.0)
                for i in range(head_dim):
                    total += x[n, base + i] * x[n, base + i]
                inverse = np.float32(1.0) / np.sqrt(total / np.float32(head_dim) + eps)
                for i in range(head_dim):
                    x[n, base + i] = weight[i] * (x[n, base + i] * inverse)

    @njit(cache=True)
    def gated_activation(gate, up, gelu):  # pragma: no cover - numba
        """In place: gate <- act(gate) · up, act SiLU (g / (1 + e^-g)) or, with ``gelu``, GELU's
        tanh form (transformers' ``gelu_pytorch_tanh``)."""
        root = np.float32(0.7978845608028654)  # sqrt(2 / pi)
        for n in range(gate.shape[0]):
            for i in range(gate.shape[1]):
                g = gate[n, i]
                if gelu:
                    inner = root * (g + np.float32(0.044715) * g * g * g)
                    gate[n, i] = np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner)) * up[n, i]
                else:
                    gate[n, i] = g / (np.float32(1.0) + np.exp(-g)) * up[n, i]

    @njit(cache=True)
    def rotate(x, n_heads, head_dim, positions, cos, sin):  # pragma: no cover - numba
        """Rotary embedding in place on x (N, heads·d), transformers' rotate_half convention:
        the first half of a head pairs with the second half."""
        half = head_dim // 2
        for n in range(x.shape[0]):
            p = positions[n]
            for h in range(n_heads):
                base = h * head_dim
                for i in range(half):
                    a = x[n, base + i]
                    b = x[n, base + half + i]
                    x[n, base + i] = a * cos[p, i] - b * sin[p, i]
                    x[n, base + half + i] = b * cos[p, half + i] + a * sin[p, half + i]

    @njit(cache=True, fastmath=_FAST)
    def _attend_one(q, keys, values, length, scale, scores, out):  # pragma: no cover - numba
        """One head of one token: softmax(q·K[:length] · scale) · V[:length] into out (d,)."""
        head_dim = q.shape[0]
        largest = np.float32(-np.inf)
        for j in range(length):
            total = np.float32(0.0)
            for i in range(head_dim):
                total += q[i] * keys[j, i]
            total *= scale
            scores[j] = total
            largest = max(largest, total)
        denominator = np.float32(0.0)
        for j in range(length):
            weight = np.exp(scores[j] - largest)
            scores[j] = weight
            denominator += weight
        for i in range(head_dim):
            out[i] = np.float32(0.0)
        inverse = np.float32(1.0) / denominator
        for j in range(length):
            weight = scores[j] * inverse
            for i in range(head_dim):
                out[i] += weight * values[j, i]

    @njit(inline="always")
    def _first_position(position, window):  # pragma: no cover - numba
        """The first cached position a token at ``position`` attends to: 0, or with a sliding
        window the last ``window`` positions (transformers: kv > position - window)."""
        return max(0, position - window + 1) if window > 0 else 0

    @njit(cache=True)
    def attend(
        q, cache_k, cache_v, layer, rows, positions, n_heads, scale, window, out
    ):  # pragma: no cover
        """Attention of every token over its row's cache, positions 0..position (causal), or
        the last ``window`` of them (> 0)."""
        n_kv, max_len, head_dim = cache_k.shape[2], cache_k.shape[3], cache_k.shape[4]
        group = n_heads // n_kv
        scores = np.empty(max_len, np.float32)
        for n in range(q.shape[0]):
            r, end = rows[n], positions[n] + 1
            start = _first_position(positions[n], window)
            for h in range(n_heads):
                kv = h // group
                base = h * head_dim
                _attend_one(
                    q[n, base : base + head_dim], cache_k[layer, r, kv, start:],
                    cache_v[layer, r, kv, start:], end - start, scale, scores,
                    out[n, base : base + head_dim],
                )  # fmt: skip

    @njit(parallel=True, cache=True)
    def attend_parallel(
        q, cache_k, cache_v, layer, rows, positions, n_heads, scale, window, out
    ):  # pragma: no cover
        """``attend`` with (token, head) pairs split over numba's threads."""
        n_kv, head_dim = cache_k.shape[2], cache_k.shape[4]
        group = n_heads // n_kv
        n_tokens = q.shape[0]
        for item in prange(n_tokens * n_heads):
            n, h = item // n_heads, item % n_heads
            start = _first_position(positions[n], window)
            scores = np.empty(positions[n] + 1 - start, np.float32)
            base = h * head_dim
            _attend_one(
                q[n, base : base + head_dim], cache_k[layer, rows[n], h // group, start:],
                cache_v[layer, rows[n], h // group, start:], positions[n] + 1 - start, scale,
                scores, out[n, base : base + head_dim],
            )  # fmt: skip

    @njit(cache=True)
    def _operands(codes, ints, index):  # pragma: no cover - numba
        """Projection ``index``'s codes (q, blocks, bytes, rows), α₁ sets, other planes and
        offset, as views of the flat buffers and of the layer's own arrays (by address)."""
        row = ints[index]
        bits = row[BITS]
        at = row[CODES_AT]
        layer_codes = codes[at : at + bits * row[BLOCKS] * row[N_BYTES] * row[ROWS]].reshape(
            (bits, row[BLOCKS], row[N_BYTES], row[ROWS])
        )
        dims = (row[SCALE_DIM_1], row[SCALE_DIM_2])
        first = carray(_float32_pointer(row[FIRST_ADDRESS]), (row[N_SETS], *dims))
        rest = carray(_float32_pointer(row[REST_ADDRESS]), (bits - 1, *dims))
        offset_shape = (row[OUT_FEATURES], row[N_GROUPS]) if row[WITH_OFFSET] else (1, 1)
        offset = carray(_float32_pointer(row[OFFSET_ADDRESS]), offset_shape)
        return layer_codes, first, rest, offset

    @njit(cache=True)
    def _unpad(y, row, biases, out):  # pragma: no cover - numba
        """out (N, out features) <- y (N, padded rows) plus the projection's bias, if any."""
        width = row[OUT_FEATURES]
        if row[HAS_BIAS]:
            bias = biases[row[BIAS_AT] : row[BIAS_AT] + width]
            for n in range(y.shape[0]):
                for i in range(width):
                    out[n, i] = y[n, i] + bias[i]
        else:
            out[:, :] = y[:, :width]

    @njit(cache=True)
    def _project(
        tag, x, index, codes, biases, ints, sets, no_sets, threads, min_parallel_work
    ):  # pragma: no cover - numba  # fmt: skip
        """Projection ``index`` (block·7 + position in ``PROJECTIONS``) of x: (N, out) float32,
        its tables built for it alone (``_project_group`` shares them among projections)."""
        row = ints[index]
        parallel = threads > 1 and row[WORK] * x.shape[0] >= min_parallel_work
        token_sets = sets if row[BANKED] else no_sets
        layer_codes, first, rest, offset = _operands(codes, ints, index)
        y = _lut_matvec(
            tag, x, row[GROUP_SIZE], layer_codes, first, rest, token_sets, offset,
            row[WITH_OFFSET] != 0, row[N_GROUPS], row[BYTES_PER_GROUP],
            threads if parallel else 1,
        )  # fmt: skip
        result = np.empty((x.shape[0], row[OUT_FEATURES]), np.float32)
        _unpad(y, row, biases, result)
        return result

    @njit(parallel=True, cache=True)
    def _group_blocks_parallel(
        tables, chunk_scales, codes, ints, first, count, sets, no_sets, threads, padded
    ):  # pragma: no cover - numba  # fmt: skip
        """The row blocks of projections first..first+count-1, one contiguous run of them for
        each of ``threads`` threads across the projections (one parallel region for q, k and v;
        the caller set numba's thread count)."""
        total = 0
        for p in range(count):
            total += ints[first + p, BLOCKS]
        n_tasks = min(total, threads)
        for task in prange(n_tasks):
            begin, end = task * total // n_tasks, (task + 1) * total // n_tasks
            start = 0
            for p in range(count):
                row = ints[first + p]
                lo, hi = max(begin, start), min(end, start + row[BLOCKS])
                if lo < hi:
                    layer_codes, first_scales, rest, _ = _operands(codes, ints, first + p)
                    row_blocks(
                        tables, chunk_scales, layer_codes, first_scales, rest,
                        sets if row[BANKED] else no_sets, row[N_GROUPS], row[BYTES_PER_GROUP],
                        lo - start, hi - start, padded[p],
                    )  # fmt: skip
                start += row[BLOCKS]

    def _project_group(
        tag, x, first, count, codes, biases, ints, sets, no_sets, threads, min_parallel_work,
        outputs,
    ):  # pragma: no cover - replaced by the overload  # fmt: skip
        raise NotImplementedError

    @overload(_project_group)
    def _project_group_overload(
        tag, x, first, count, codes, biases, ints, sets, no_sets, threads, min_parallel_work,
        outputs,
    ):  # fmt: skip
        """Projections first..first+count-1 of the same input x into ``outputs[p]`` (N, out).

        AVX2: x's tables are built once for all of them (q, k and v read the same normed
        input, as do gate and up; ``weights.build_weights`` checks that their groups match),
        and their row blocks run in one parallel region. AVX-512: one ``_project`` each."""
        if tag.dtype == types.int16:

            def each(
                tag, x, first, count, codes, biases, ints, sets, no_sets, threads,
                min_parallel_work, outputs,
            ):  # fmt: skip
                for p in range(count):
                    outputs[p][:, :] = _project(
                        tag, x, first + p, codes, biases, ints, sets, no_sets, threads,
                        min_parallel_work,
                    )  # fmt: skip

            return each

        def shared(
            tag, x, first, count, codes, biases, ints, sets, no_sets, threads,
            min_parallel_work, outputs,
        ):  # fmt: skip
            n_tokens = x.shape[0]
            head = ints[first]
            work = 0
            with_sums = False
            for p in range(count):
                work += ints[first + p, WORK]
                with_sums = with_sums or ints[first + p, WITH_OFFSET] != 0
            parallel = threads > 1 and work * n_tokens >= min_parallel_work
            tables, chunk_scales, group_sums = _tables(
                tag, x, head[GROUP_SIZE], head[N_GROUPS], head[BYTES_PER_GROUP], head[N_BYTES],
                with_sums, threads if parallel else 1,
            )  # fmt: skip
            padded = [
                np.empty((n_tokens, ints[first + p, BLOCKS] * ints[first + p, ROWS]), np.float32)
                for p in range(count)
            ]
            if parallel:
                _group_blocks_parallel(
                    tables, chunk_scales, codes, ints, first, count, sets, no_sets, threads,
                    padded,
                )  # fmt: skip
            for p in range(count):
                row = ints[first + p]
                layer_codes, first_scales, rest, offset = _operands(codes, ints, first + p)
                if not parallel:
                    row_blocks(
                        tables, chunk_scales, layer_codes, first_scales, rest,
                        sets if row[BANKED] else no_sets, row[N_GROUPS], row[BYTES_PER_GROUP],
                        0, row[BLOCKS], padded[p],
                    )  # fmt: skip
                if row[WITH_OFFSET]:
                    add_offset(padded[p], offset, group_sums)
                _unpad(padded[p], row, biases, outputs[p])

        return shared

    @njit(cache=True)
    def _add_residual(hidden, update, sandwich, weight, eps, scratch):  # pragma: no cover
        """hidden += update, or with ``sandwich`` hidden += rms_norm(update) (Gemma's norms of
        the attention's and the MLP's outputs); ``scratch`` (N, H) is free to overwrite."""
        if sandwich:
            rms_norm(update, weight, eps, scratch)
            hidden += scratch
        else:
            hidden += update

    @njit(cache=True)
    def forward_tokens(
        tag, hidden, rows, positions, sets, cache_k, cache_v, cos, sin, layer_rotary, windows,
        norms, qk_norms, final_norm, codes, biases, ints, eps, scale, sandwich, qk_norm, gelu,
        n_heads, threads, min_parallel_work, min_parallel_attention,
    ):  # pragma: no cover - numba  # fmt: skip
        """Every block for N tokens; returns the final-normed hidden states (N, H).

        hidden (N, H) float32 is the embedded tokens (overwritten: the residual stream). Token n
        belongs to cache row ``rows[n]`` at ``positions[n]`` and uses scale set ``sets[n]`` in
        banked projections. cache_k / cache_v: (L, rows, kv heads, max_len, d). cos / sin:
        (R, max_len, d), layer l using table ``layer_rotary[l]``; ``windows[l]`` > 0 limits
        layer l's attention to that many last positions. norms: (L, 2, H), the input and
        post-attention RMSNorm weights, or with ``sandwich`` (L, 4, H): input, post-attention
        (of the attention's output), pre-MLP, post-MLP (of the MLP's output). qk_norms
        (L, 2, d): the query and key norms, used with ``qk_norm``. ``scale`` multiplies q·k;
        ``gelu`` gates the MLP with tanh-GELU instead of SiLU (``forms.BlockForm``).
        codes / biases: flat buffers (uint8, float32) holding every projection's codes in the
        kernel's layout and biases; ints: (L·7, INT_COLUMNS) int64, per projection (block·7 +
        index in ``PROJECTIONS``) its scalars and where its operands are (the scales and offset
        by address: the caller keeps those arrays alive). ``threads`` > 1 lets projections that
        share an input and do at least ``min_parallel_work`` code bits × tokens together, and
        attention of at least ``min_parallel_attention`` cached positions × heads, run on
        numba's threads.
        """
        n_tokens, width = hidden.shape
        n_layers = norms.shape[0]
        n_kv, head_dim = cache_k.shape[2], cache_k.shape[4]
        mlp_norm, post_mlp = SANDWICH_MLP_NORMS if sandwich else LLAMA_MLP_NORMS
        no_sets = np.zeros(n_tokens, np.int64)
        normed = np.empty((n_tokens, width), np.float32)
        attention = np.empty((n_tokens, n_heads * head_dim), np.float32)

        def outputs(index, count):
            return [np.empty((n_tokens, ints[index + p, OUT_FEATURES]), np.float32)
                    for p in range(count)]  # fmt: skip

        cached = 0
        for n in range(n_tokens):
            cached += positions[n] + 1
        parallel_attention = threads > 1 and cached * n_heads >= min_parallel_attention
        for layer in range(n_layers):
            base = 7 * layer
            rms_norm(hidden, norms[layer, 0], eps, normed)
            qkv = outputs(base, 3)
            _project_group(tag, normed, base, 3, codes, biases, ints, sets, no_sets, threads,
                           min_parallel_work, qkv)  # fmt: skip
            q, k, v = qkv[0], qkv[1], qkv[2]
            if qk_norm:
                head_norm(q, n_heads, head_dim, qk_norms[layer, 0], eps)
                head_norm(k, n_kv, head_dim, qk_norms[layer, 1], eps)
            table = layer_rotary[layer]
            rotate(q, n_heads, head_dim, positions, cos[table], sin[table])
            rotate(k, n_kv, head_dim, positions, cos[table], sin[table])
            for n in range(n_tokens):
                r, p = rows[n], positions[n]
                for h in range(n_kv):
                    for i in range(head_dim):
                        cache_k[layer, r, h, p, i] = k[n, h * head_dim + i]
                        cache_v[layer, r, h, p, i] = v[n, h * head_dim + i]
            if parallel_attention:
                attend_parallel(q, cache_k, cache_v, layer, rows, positions, n_heads, scale,
                                windows[layer], attention)  # fmt: skip
            else:
                attend(q, cache_k, cache_v, layer, rows, positions, n_heads, scale,
                       windows[layer], attention)  # fmt: skip
            o = outputs(base + 3, 1)
            _project_group(tag, attention, base + 3, 1, codes, biases, ints, sets, no_sets,
                           threads, min_parallel_work, o)  # fmt: skip
            _add_residual(hidden, o[0], sandwich, norms[layer, 1], eps, normed)
            rms_norm(hidden, norms[layer, mlp_norm], eps, normed)
            gate_up = outputs(base + 4, 2)
            _project_group(tag, normed, base + 4, 2, codes, biases, ints, sets, no_sets,
                           threads, min_parallel_work, gate_up)  # fmt: skip
            gate, up = gate_up[0], gate_up[1]
            gated_activation(gate, up, gelu)
            down = outputs(base + 6, 1)
            _project_group(tag, gate, base + 6, 1, codes, biases, ints, sets, no_sets, threads,
                           min_parallel_work, down)  # fmt: skip
            _add_residual(hidden, down[0], sandwich, norms[layer, post_mlp], eps, normed)
        rms_norm(hidden, final_norm, eps, normed)
        return normed
