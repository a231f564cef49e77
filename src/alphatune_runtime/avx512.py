"""LUT-GEMV for BCQ decode on AVX-512 CPUs: 16-entry tables kept in a register (numba + LLVM).

Torch-free (numpy arrays in and out): ``alphatune.kernels.avx512_lut`` is its torch face, with the
contract of ``alphatune.kernels.reference.bcq_matmul_reference``, plus a mixed-task form where
every token picks its own set of scales.

Algorithm (T-MAC, Wei et al. 2024, in LUT-GEMM's spirit). For every 4 activations
``x[4j .. 4j+3]`` of a token, a table of the 16 signed partial sums

    table[j, m] = Σ_b (bit b of m ? +x[4j+b] : -x[4j+b])

fits one 512-bit register. One packed code byte holds 8 codes of a row (``alphatune.packing``):
its low nibble indexes the table of inputs 8k..8k+3, its high nibble that of 8k+4..8k+7. With the
codes of 16 rows side by side, one ``vpermps`` looks up 16 rows at once, so a code byte plane of
16 rows costs two permutes, one add and one fused multiply-add by the 16 rows' α:

    y[rows] += α_i[rows, group] * (table_lo[nibble_lo] + table_hi[nibble_hi])

That is 6 vector instructions per 128 weights of a plane, against 128 multiply-adds for fp32
(8 zmm FMAs, plus 512 bytes of weights read instead of 16 bytes of codes).

Layout (``layout``, ``dispatch.NativeKernel.prepare_*``, done once per layer and cached by the
caller while the scales are unchanged; shared with the AVX2 kernel, in blocks of 16 rows here): codes
``(q, out/16, ceil(in/8), 16)`` uint8, i.e. each byte column of 16 consecutive rows made
contiguous; scales float32 with rows contiguous so 16 rows' α load as one vector: α₁ as
``(S, G, out)``, the other planes as ``(q-1, G, out)``. ``S`` is the number of α₁ sets: 1 normally,
one per adapter for a mixed-task batch (the other planes are shared by all tasks).
Rows are padded to a multiple of 16 with zero codes and zero scales.

Inputs past ``in_features`` (the padding bits of a partial last byte) are treated as activations
equal to 0, so they add nothing. Groups must not split a code byte (``group_size % 8 == 0``, or
one group per row).

The vector code is LLVM IR emitted through a numba intrinsic: it needs AVX-512F (``available()``).
Everything is float32.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

try:
    import llvmlite.binding as llvm_binding
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    IMPORT_ERROR = exc

ROWS = 16  # rows per vector: one float32 lane each in a 512-bit register
_ROW_BLOCKS_PER_TASK = 8  # parallel work item: 128 rows
MIN_PARALLEL_WORK = 1 << 21  # weights × tokens below which one thread beats a thread launch


def available() -> bool:
    """True when numba imports and this CPU has AVX-512F (the ``vpermps`` the kernel is built on)."""
    return IMPORT_ERROR is None and _host_has_avx512()


@functools.cache
def _host_has_avx512() -> bool:
    # Asked once: llvmlite's feature query costs ~0.3 ms, and dispatch asks on every call.
    return bool(llvm_binding.get_host_cpu_features().get("avx512f", False))


# ----------------------------------------------------------------------------- the vector loop

if IMPORT_ERROR is None:
    from alphatune_runtime.lut import add_offset, build_tables

    _F32 = ir.FloatType()
    _VEC = ir.VectorType(_F32, ROWS)
    _IVEC = ir.VectorType(ir.IntType(32), ROWS)
    _BVEC = ir.VectorType(ir.IntType(8), ROWS)

    @intrinsic
    def _row_block_dot(
        typingctx: Any,
        tables: Any,
        table_base: Any,
        codes: Any,
        code_base: Any,
        code_plane_stride: Any,
        first: Any,
        first_base: Any,
        alpha: Any,
        alpha_base: Any,
        alpha_plane_stride: Any,
        alpha_group_stride: Any,
        n_planes: Any,
        n_groups: Any,
        bytes_per_group: Any,
        y: Any,
        y_base: Any,
    ) -> Any:
        """16 rows of one token: ``y[y_base:+16] = Σ_g Σ_i α · (table_lo[lo] + table_hi[hi])``.

        All arrays are flat and C-contiguous; the ``*_base`` / ``*_stride`` arguments are element
        offsets. Codes of plane i, byte k: ``codes[code_base + i*code_plane_stride + 16k : +16]``;
        tables of byte k: ``tables[table_base + 32k : +32]``; α of plane i, group g:
        ``first[first_base + g*alpha_group_stride : +16]`` for plane 0 (α₁, per scale set) and
        ``alpha[alpha_base + (i-1)*alpha_plane_stride + g*alpha_group_stride : +16]`` for i >= 1.
        """
        sig = types.void(
            tables, table_base, codes, code_base, code_plane_stride, first, first_base, alpha,
            alpha_base, alpha_plane_stride, alpha_group_stride, n_planes, n_groups,
            bytes_per_group, y, y_base,
        )  # fmt: skip

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            tables_ptr, codes_ptr, first_ptr, alpha_ptr, y_ptr = (
                context.make_array(signature.args[p])(context, builder, args[p]).data
                for p in (0, 2, 5, 7, 14)
            )
            intp = context.get_value_type(types.intp)

            def as_intp(value: Any) -> Any:
                return builder.sext(value, intp) if value.type.width < intp.width else value

            (table_base, code_base, code_plane_stride, first_base, alpha_base, alpha_plane_stride,
             alpha_group_stride, n_planes, n_groups, bytes_per_group, y_base) = (
                as_intp(args[i]) for i in (1, 3, 4, 6, 8, 9, 10, 11, 12, 13, 15)
            )  # fmt: skip

            def const(value: int) -> Any:
                return ir.Constant(intp, value)

            permute = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(_VEC, [_VEC, _IVEC]),
                "llvm.x86.avx512.permvar.sf.512",
            )
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]), "llvm.fma.v16f32"
            )
            low_nibble = ir.Constant(_IVEC, [15] * ROWS)
            nibble_shift = ir.Constant(_IVEC, [4] * ROWS)

            def load_vector(pointer: Any, index: Any, vector_type: Any = _VEC) -> Any:
                address = builder.bitcast(builder.gep(pointer, [index]), vector_type.as_pointer())
                return builder.load(address, align=1)

            # Three accumulators: two for alternating bytes (the FMAs' latency overlaps), one
            # for a group's odd last byte. allocas in the entry block become registers.
            sums = [cgutils.alloca_once(builder, _VEC) for _ in range(3)]
            for total in sums:
                builder.store(ir.Constant(_VEC, None), total)

            def plane_byte(k: Any, g: Any, plane: Any, total: Any) -> None:
                code_index = builder.add(
                    builder.add(code_base, builder.mul(plane, code_plane_stride)),
                    builder.mul(k, const(16)),
                )
                index = builder.zext(load_vector(codes_ptr, code_index, _BVEC), _IVEC)
                table = builder.add(table_base, builder.mul(k, const(32)))
                low = builder.call(
                    permute, [load_vector(tables_ptr, table), builder.and_(index, low_nibble)]
                )
                high = builder.call(
                    permute,
                    [
                        load_vector(tables_ptr, builder.add(table, const(16))),
                        builder.lshr(index, nibble_shift),
                    ],
                )
                # Plane 0 (α₁) from its scale set, the other planes from the shared scales:
                # a mixed-task batch reads every set's α₁ but the rest only once.
                group_offset = builder.mul(g, alpha_group_stride)
                rest_index = builder.add(
                    builder.add(
                        alpha_base, builder.mul(builder.sub(plane, const(1)), alpha_plane_stride)
                    ),
                    group_offset,
                )
                first_address = builder.gep(first_ptr, [builder.add(first_base, group_offset)])
                rest_address = builder.gep(alpha_ptr, [rest_index])
                is_first = builder.icmp_unsigned("==", plane, const(0))
                address = builder.select(is_first, first_address, rest_address)
                scale = builder.load(builder.bitcast(address, _VEC.as_pointer()), align=1)
                builder.store(
                    builder.call(fma, [scale, builder.fadd(low, high), builder.load(total)]), total
                )

            with cgutils.for_range(builder, n_groups) as group_loop:
                g = group_loop.index
                first = builder.mul(g, bytes_per_group)
                pairs = builder.udiv(bytes_per_group, const(2))
                with cgutils.for_range(builder, pairs) as pair_loop:
                    k = builder.add(first, builder.mul(pair_loop.index, const(2)))
                    with cgutils.for_range(builder, n_planes) as plane_loop:
                        plane_byte(k, g, plane_loop.index, sums[0])
                        plane_byte(builder.add(k, const(1)), g, plane_loop.index, sums[1])
                odd = builder.icmp_unsigned("!=", builder.mul(pairs, const(2)), bytes_per_group)
                with builder.if_then(odd):
                    last = builder.add(first, builder.sub(bytes_per_group, const(1)))
                    with cgutils.for_range(builder, n_planes) as plane_loop:
                        plane_byte(last, g, plane_loop.index, sums[2])
            result = builder.fadd(
                builder.fadd(builder.load(sums[0]), builder.load(sums[1])), builder.load(sums[2])
            )
            out = builder.bitcast(builder.gep(y_ptr, [y_base]), _VEC.as_pointer())
            builder.store(result, out, align=1)
            return context.get_dummy_value()

        return sig, codegen

    @njit(cache=True)
    def _row_blocks(
        tables,
        codes,
        first_scales,
        rest_scales,
        token_set,
        n_groups,
        bytes_per_group,
        first,
        last,
        y,
    ):  # pragma: no cover - numba
        """Row blocks first..last-1 of every token; codes stay in L1 while the tokens pass."""
        n_tokens, table_width = tables.shape
        bits, n_blocks, n_bytes, _ = codes.shape
        out = n_blocks * ROWS
        plane_width = n_groups * out
        flat_tables, flat_codes, flat_first, flat_rest, flat_y = (
            tables.reshape(-1),
            codes.reshape(-1),
            first_scales.reshape(-1),
            rest_scales.reshape(-1),
            y.reshape(-1),
        )
        for block in range(first, last):
            for t in range(n_tokens):
                _row_block_dot(
                    flat_tables, t * table_width,
                    flat_codes, block * n_bytes * ROWS, n_blocks * n_bytes * ROWS,
                    flat_first, token_set[t] * plane_width + block * ROWS,
                    flat_rest, block * ROWS, plane_width, out,
                    bits, n_groups, bytes_per_group,
                    flat_y, t * out + block * ROWS,
                )  # fmt: skip

    @njit(parallel=True, cache=True)
    def _row_blocks_parallel(
        tables, codes, first_scales, rest_scales, token_set, n_groups, bytes_per_group, y
    ):  # pragma: no cover - numba
        n_blocks = codes.shape[1]
        n_tasks = (n_blocks + _ROW_BLOCKS_PER_TASK - 1) // _ROW_BLOCKS_PER_TASK
        for task in prange(n_tasks):
            first = task * _ROW_BLOCKS_PER_TASK
            last = min(n_blocks, first + _ROW_BLOCKS_PER_TASK)
            _row_blocks(
                tables, codes, first_scales, rest_scales, token_set, n_groups, bytes_per_group,
                first, last, y,
            )  # fmt: skip

    @njit(cache=True)
    def _decode(
        x,
        group_size,
        codes,
        first_scales,
        rest_scales,
        token_set,
        offset,
        with_offset,
        n_groups,
        bytes_per_group,
        parallel,
    ):  # pragma: no cover - numba
        """The whole matmul in one call: a decode step calls this ~200 times per token on a small
        model, so every Python-side allocation and call shows. ``parallel`` splits the row blocks
        over numba's threads (the caller sets their number)."""
        n_tokens = x.shape[0]
        _, n_blocks, n_bytes, _ = codes.shape
        tables = np.empty((n_tokens, 32 * n_bytes), np.float32)
        group_sums = np.empty((n_tokens, n_groups), np.float32)
        build_tables(x, group_size, tables, group_sums, with_offset)
        y = np.empty((n_tokens, n_blocks * ROWS), np.float32)
        if parallel:
            _row_blocks_parallel(
                tables, codes, first_scales, rest_scales, token_set, n_groups, bytes_per_group, y
            )
        else:
            _row_blocks(
                tables, codes, first_scales, rest_scales, token_set, n_groups, bytes_per_group, 0,
                n_blocks, y,
            )  # fmt: skip
        if with_offset:
            add_offset(y, offset, group_sums)
        return y

    # The njit core, public for native callers (``native``): ``decode_native(x (T, in)
    # float32 C, group_size, codes, first, rest, token_set (T,) int64, offset, with_offset,
    # n_groups, bytes_per_group, parallel) -> y (T, padded out)``; same function as ``decoder``.
    decode_native = _decode
