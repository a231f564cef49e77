"""The numba step: a Llama block stack over a flat list of tokens, in one native call.

``forward_tokens`` runs every block for ``N`` tokens, each with its own cache row, position and
scale set (adapter), and returns the final-normed hidden states. Decode passes one token per
batch row; prefill passes chunks of prompt tokens (several rows mixed). Each block writes the
chunk's keys and values into the cache before any token attends, and a token attends to its
row's positions ``0..position``: that is the causal mask, with no padding anywhere.

The seven projections of a block call the LUT kernel's njit core (``decode_native`` of
``kernels.avx2_lut`` or ``kernels.avx512_lut``) directly, so no Python runs between layers: the
per-token framework cost of the transformers path (module calls, dispatch, tensor <-> numpy)
is gone. Which kernel is compiled in is decided at typing time by the dtype of ``kernel_tag``
(``KERNEL_TAGS``), so an AVX2-only CPU never compiles the AVX-512 loop, and the step stays
cacheable on disk (numba does not cache functions that take other functions as arguments).

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

# kernel_tag dtype -> the kernel whose njit core the step calls.
KERNEL_TAGS = {"avx2": np.int8, "avx2-int16": np.int8, "avx2-int8": np.int8, "avx512": np.int16}

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

# Columns of the per-projection integer table (``ints``): the kernel's scalars, then where each
# operand is. Codes and biases start at an offset in the engine's flat buffers; the scales and the
# offset are at a memory address (``*_ADDRESS``), as the kernel may read them where the layer keeps
# them (``lut_common.scales_in_layer_order``), with the last two dimensions of the scale arrays
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
    from alphatune.kernels import avx2_lut, avx512_lut

    def _lut_matvec(
        tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
        bytes_per_group, table_bits, parallel,
    ):  # pragma: no cover - replaced by the overload  # fmt: skip
        raise NotImplementedError

    @overload(_lut_matvec)
    def _lut_matvec_overload(
        tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
        bytes_per_group, table_bits, parallel,
    ):  # fmt: skip
        """Picks the kernel from the tag's dtype at typing time (see the module docstring)."""
        if tag.dtype == types.int16:
            decode512 = avx512_lut.decode_native

            def call512(
                tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
                bytes_per_group, table_bits, parallel,
            ):  # fmt: skip
                return decode512(
                    x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
                    bytes_per_group, parallel,
                )  # fmt: skip

            return call512
        decode2 = avx2_lut.decode_native

        def call2(
            tag, x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
            bytes_per_group, table_bits, parallel,
        ):  # fmt: skip
            return decode2(
                x, group_size, codes, first, rest, sets, offset, with_offset, n_groups,
                bytes_per_group, table_bits, parallel,
            )  # fmt: skip

        return call2

    @intrinsic
    def _float32_pointer(typingctx, address):  # pragma: no cover - numba
        """The float32 array at memory ``address`` (an int64 from ``ndarray.ctypes.data``)."""
        sig = types.CPointer(types.float32)(address)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    @njit(cache=True, fastmath=_FAST)
    def rms_norm(x, weight, eps, out):  # pragma: no cover - numba
        """out[n] = x[n] / sqrt(mean(x[n]²) + eps) · weight (LlamaRMSNorm, float32)."""
        n_tokens, width = x.shape
        for n in range(n_tokens):
            total = np.float32(0.0)
            for i in range(width):
                total += x[n, i] * x[n, i]
            inverse = np.float32(1.0) / np.sqrt(total / np.float32(width) + eps)
            for i in range(width):
                out[n, i] = weight[i] * (x[n, i] * inverse)

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

    @njit(cache=True)
    def attend(
        q, cache_k, cache_v, layer, rows, positions, n_heads, scale, out
    ):  # pragma: no cover
        """Attention of every token over its row's cache, positions 0..position (causal)."""
        n_kv, max_len, head_dim = cache_k.shape[2], cache_k.shape[3], cache_k.shape[4]
        group = n_heads // n_kv
        scores = np.empty(max_len, np.float32)
        for n in range(q.shape[0]):
            r, length = rows[n], positions[n] + 1
            for h in range(n_heads):
                kv = h // group
                base = h * head_dim
                _attend_one(
                    q[n, base : base + head_dim], cache_k[layer, r, kv], cache_v[layer, r, kv],
                    length, scale, scores, out[n, base : base + head_dim],
                )  # fmt: skip

    @njit(parallel=True, cache=True)
    def attend_parallel(
        q, cache_k, cache_v, layer, rows, positions, n_heads, scale, out
    ):  # pragma: no cover
        """``attend`` with (token, head) pairs split over numba's threads."""
        n_kv, head_dim = cache_k.shape[2], cache_k.shape[4]
        group = n_heads // n_kv
        n_tokens = q.shape[0]
        for item in prange(n_tokens * n_heads):
            n, h = item // n_heads, item % n_heads
            scores = np.empty(positions[n] + 1, np.float32)
            base = h * head_dim
            _attend_one(
                q[n, base : base + head_dim], cache_k[layer, rows[n], h // group],
                cache_v[layer, rows[n], h // group], positions[n] + 1, scale, scores,
                out[n, base : base + head_dim],
            )  # fmt: skip

    @njit(cache=True)
    def _project(
        tag, x, index, codes, biases, ints, sets, no_sets, table_bits, threads,
        min_parallel_work,
    ):  # pragma: no cover - numba  # fmt: skip
        """Projection ``index`` (block·7 + position in ``PROJECTIONS``) of x: (N, out) float32."""
        row = ints[index]
        parallel = threads > 1 and row[WORK] * x.shape[0] >= min_parallel_work
        token_sets = sets if row[BANKED] else no_sets
        bits, blocks, n_groups, out = row[BITS], row[BLOCKS], row[N_GROUPS], row[OUT_FEATURES]
        at = row[CODES_AT]
        layer_codes = codes[at : at + bits * blocks * row[N_BYTES] * row[ROWS]].reshape(
            (bits, blocks, row[N_BYTES], row[ROWS])
        )
        dims = (row[SCALE_DIM_1], row[SCALE_DIM_2])
        layer_first = carray(_float32_pointer(row[FIRST_ADDRESS]), (row[N_SETS], *dims))
        layer_rest = carray(_float32_pointer(row[REST_ADDRESS]), (bits - 1, *dims))
        offset_shape = (out, n_groups) if row[WITH_OFFSET] else (1, 1)
        layer_offset = carray(_float32_pointer(row[OFFSET_ADDRESS]), offset_shape)
        y = _lut_matvec(
            tag, x, row[GROUP_SIZE], layer_codes, layer_first, layer_rest, token_sets,
            layer_offset, row[WITH_OFFSET] != 0, n_groups, row[BYTES_PER_GROUP], table_bits,
            parallel,
        )  # fmt: skip
        result = np.empty((x.shape[0], out), np.float32)
        if row[HAS_BIAS]:
            bias = biases[row[BIAS_AT] : row[BIAS_AT] + out]
            for n in range(x.shape[0]):
                for i in range(out):
                    result[n, i] = y[n, i] + bias[i]
        else:
            result[:, :] = y[:, :out]
        return result

    @njit(cache=True)
    def forward_tokens(
        tag, hidden, rows, positions, sets, cache_k, cache_v, cos, sin, norms, final_norm,
        codes, biases, ints, eps, n_heads, table_bits, threads,
        min_parallel_work, min_parallel_attention,
    ):  # pragma: no cover - numba  # fmt: skip
        """Every block for N tokens; returns the final-normed hidden states (N, H).

        hidden (N, H) float32 is the embedded tokens (overwritten: the residual stream). Token n
        belongs to cache row ``rows[n]`` at ``positions[n]`` and uses scale set ``sets[n]`` in
        banked projections. cache_k / cache_v: (L, rows, kv heads, max_len, d). cos / sin:
        (max_len, d). norms: (L, 2, H), the input and post-attention RMSNorm weights.
        codes / biases: flat buffers (uint8, float32) holding every projection's codes in the
        kernel's layout and biases; ints: (L·7, INT_COLUMNS) int64, per projection (block·7 +
        index in ``PROJECTIONS``) its scalars and where its operands are (the scales and offset
        by address: the caller keeps those arrays alive). ``threads`` > 1 lets layers
        of at least ``min_parallel_work`` code bits × tokens, and attention of at least
        ``min_parallel_attention`` cached positions × heads, run on numba's threads.
        """
        n_tokens, width = hidden.shape
        n_layers = norms.shape[0]
        n_kv, head_dim = cache_k.shape[2], cache_k.shape[4]
        scale = np.float32(1.0) / np.sqrt(np.float32(head_dim))
        no_sets = np.zeros(n_tokens, np.int64)
        normed = np.empty((n_tokens, width), np.float32)
        attention = np.empty((n_tokens, n_heads * head_dim), np.float32)
        cached = 0
        for n in range(n_tokens):
            cached += positions[n] + 1
        parallel_attention = threads > 1 and cached * n_heads >= min_parallel_attention
        for layer in range(n_layers):
            base = 7 * layer
            rms_norm(hidden, norms[layer, 0], eps, normed)
            q = _project(tag, normed, base, codes, biases, ints, sets,
                         no_sets, table_bits, threads, min_parallel_work)  # fmt: skip
            k = _project(tag, normed, base + 1, codes, biases, ints, sets,
                         no_sets, table_bits, threads, min_parallel_work)  # fmt: skip
            v = _project(tag, normed, base + 2, codes, biases, ints, sets,
                         no_sets, table_bits, threads, min_parallel_work)  # fmt: skip
            rotate(q, n_heads, head_dim, positions, cos, sin)
            rotate(k, n_kv, head_dim, positions, cos, sin)
            for n in range(n_tokens):
                r, p = rows[n], positions[n]
                for h in range(n_kv):
                    for i in range(head_dim):
                        cache_k[layer, r, h, p, i] = k[n, h * head_dim + i]
                        cache_v[layer, r, h, p, i] = v[n, h * head_dim + i]
            if parallel_attention:
                attend_parallel(q, cache_k, cache_v, layer, rows, positions, n_heads, scale,
                                attention)  # fmt: skip
            else:
                attend(q, cache_k, cache_v, layer, rows, positions, n_heads, scale, attention)
            o = _project(tag, attention, base + 3, codes, biases, ints,
                         sets, no_sets, table_bits, threads, min_parallel_work)  # fmt: skip
            hidden += o
            rms_norm(hidden, norms[layer, 1], eps, normed)
            gate = _project(tag, normed, base + 4, codes, biases, ints,
                            sets, no_sets, table_bits, threads, min_parallel_work)  # fmt: skip
            up = _project(tag, normed, base + 5, codes, biases, ints, sets,
                          no_sets, table_bits, threads, min_parallel_work)  # fmt: skip
            # SiLU-gated MLP: silu(g) · u, with silu(g) = g / (1 + e^-g).
            for n in range(n_tokens):
                for i in range(gate.shape[1]):
                    g = gate[n, i]
                    gate[n, i] = g / (np.float32(1.0) + np.exp(-g)) * up[n, i]
            down = _project(tag, gate, base + 6, codes, biases, ints, sets,
                            no_sets, table_bits, threads, min_parallel_work)  # fmt: skip
            hidden += down
        rms_norm(hidden, final_norm, eps, normed)
        return normed
