"""The AVX2 LUT-GEMV kernel for BCQ decode (numba + LLVM): float32, int16 or int8 tables.

Torch-free (numpy arrays in and out): ``alphatune.kernels.avx2_lut`` is its torch face, with the
contract of ``alphatune.kernels.reference.bcq_matmul_reference``. The same algorithm, layout and
mixed-task form as ``avx512`` (T-MAC's tables: for every 4 activations of a token the 16 signed
partial sums ``Σ ±x``; a code byte's low nibble indexes the table of inputs 8k..8k+3, its high
nibble that of 8k+4..8k+7), with 256-bit registers:

- **float32 tables** (``table_bits`` 0, the default; exact up to summation order). A
  16-entry table does not fit a ymm register, but it is odd under complement
  (``table[m] = -table[15 - m]``): the kernel's copy of the codes stores each nibble m >= 8 as
  ``m ^ 7`` (``MIRRORED``), whose low 3 bits index entries 0-7 (one ``vpermps``, which reads 3
  index bits) and whose bit 3 negates the value. Code bytes are loaded sign-extended to 32 bits,
  which puts the high nibble's bit 3 in the sign bit. A byte of 8 rows and one plane: 11 vector
  instructions (AVX-512: 6 for 16 rows). The int8 tables are stored in the same nibble order.
- **int8 tables** (``table_bits`` 8; approximate). Each table is quantized to int8 with
  one scale per token and chunk of at most 128 code bytes within a group (the group itself for
  groups of up to 1024 inputs): ``s = max |table| / 127``, ``Q = round(table / s)``. One
  ``vpshufb`` looks up 32 rows' nibbles in a 16-byte table; the low- and high-nibble results are
  interleaved and summed into int16 by ``vpmaddubsw``; per chunk and plane the int16 sums become
  float and take ``α · s``. A byte of 32 rows: 12 vector instructions, 3.7x fewer per weight than
  the float32 tables. No int16 overflow: ``|Q_lo + Q_hi| <= 254`` per byte, 128 bytes at most.

- **int16 tables** (``table_bits`` 16; within ~1e-4 of float32). As int8, with
  ``s = max |table| / 32767`` per chunk of at most 64 bytes, and each level split into its low
  byte (unsigned) and high byte (signed): four ``vpshufb`` per code byte, the low bytes' and the
  high bytes' sums kept apart in int16 (``≤ 64 · 510`` and ``≤ 64 · 256``: no overflow) and
  joined per chunk as ``256 · Σ high + Σ low``. A byte of 32 rows: ~22 vector instructions, 2x
  fewer per weight than the float32 tables, with 256x less table error than int8.

  **Error bound (both integer tables).** Each looked-up entry is off by at most ``s/2``, so for
  every token and row ``|y - y_exact| <= Σ_i Σ_chunks |α_i[row, group]| · s_chunk ·
  bytes_chunk`` (two lookups per byte), plus float32 rounding. In practice the errors are
  independent and much smaller: on SmolLM2's activations and 3-bit weights the output is off by
  ~1% RMS with int8 tables, ~256x less with int16 (the weights' own quantization error is
  ~20-30%).

Layout (``layout``, ``dispatch.NativeKernel.prepare_*``): codes
``(q, ceil(out/32), ceil(in/8), 32)`` uint8, the byte columns of 32 consecutive rows contiguous (one ``vpshufb`` operand, or four
8-row float vectors), rows padded to a multiple of 32 with zero codes. Scales stay in the layers'
own order, float32 ``(S, out, G)`` for α₁ (``S`` scale sets: one, or one per adapter in a
mixed-task batch) and ``(q-1, out, G)`` for the other planes: both loops sum a group's lookups
per plane before scaling, so the 32 scalar loads that gather a group's scales (stride G) come
once per group and plane (on SmolLM2 a group is 18 code bytes: 72 code loads and 144 lookups per
plane), and a decoder or the engine reads the layer's tensors in place instead of holding a
second copy (rows are padded with zero scales only when ``out`` is not a multiple of
32: then it is a copy). Groups must not split a code byte (``group_size % 8 == 0``, or one group
per row).

The vector code is LLVM IR emitted through a numba intrinsic: it needs AVX2 and FMA
(``available()``). Everything is float32.
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

ROWS = 32  # rows per block: one byte each in a 256-bit register, or four 8-lane float vectors
LANES = 8  # float32 lanes in a 256-bit register
CHUNK_BYTES = 128  # int8 tables: code bytes per table scale at most (int16 sums stay < 2^15)
CHUNK_BYTES_INT16 = 64  # int16 tables: the low bytes' sums (< 510 a byte) stay < 2^15
TABLE_BITS = (0, 16, 8)  # float32 tables, or integer levels of 16 or 8 bits
MIN_PARALLEL_WORK = 1 << 21  # weights × tokens below which one thread beats a thread launch


def _mirror(nibble: int) -> int:
    return nibble if nibble < 8 else nibble ^ 7


# A table is odd under complement: table[m] = -table[15 - m]. Each nibble m >= 8 is stored as
# m ^ 7 (bit 3 kept): its low 3 bits index table[15 - m] among entries 0-7, bit 3 negates. The
# map is its own inverse.
MIRRORED = np.array([_mirror(b & 15) | _mirror(b >> 4) << 4 for b in range(256)], np.uint8)


def available() -> bool:
    """True when numba imports and this CPU has AVX2 and FMA (``vpermps``, ``vpshufb``, FMA)."""
    return IMPORT_ERROR is None and _host_has_avx2()


@functools.cache
def _host_has_avx2() -> bool:
    # Asked once: llvmlite's feature query costs ~0.3 ms, and dispatch asks on every call.
    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("avx2", False) and features.get("fma", False))


# ----------------------------------------------------------------------------- the vector loop

if IMPORT_ERROR is None:
    from alphatune_runtime.lut import add_offset, build_tables

    _I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    _F32 = ir.FloatType()
    _VEC = ir.VectorType(_F32, LANES)  # 8 rows' float32
    _IVEC = ir.VectorType(_I32, LANES)  # 8 rows' int32
    _CODES8 = ir.VectorType(_I8, LANES)  # 8 rows' code bytes
    _BYTES = ir.VectorType(_I8, ROWS)  # 32 rows' code bytes, or two 16-byte tables
    _TABLE8 = ir.VectorType(_I8, 16)  # one int8 table
    _WORDS = ir.VectorType(_I16, 16)  # 16 int16 sums

    def _shuffle_mask(indices: list[int]) -> Any:
        return ir.Constant(ir.VectorType(_I32, len(indices)), indices)

    # vpunpcklbw / vpunpckhbw: interleave the bytes of two registers within each 128-bit lane.
    _UNPACK_LOW = _shuffle_mask(
        [i for lane in (0, 16) for b in range(8) for i in (lane + b, 32 + lane + b)]
    )
    _UNPACK_HIGH = _shuffle_mask(
        [i for lane in (0, 16) for b in range(8, 16) for i in (lane + b, 32 + lane + b)]
    )

    @intrinsic
    def _row_block_dot(
        typingctx: Any,
        tables: Any,
        table_base: Any,
        chunk_scales: Any,
        chunk_base: Any,
        codes: Any,
        code_base: Any,
        code_plane_stride: Any,
        first: Any,
        first_base: Any,
        alpha: Any,
        alpha_base: Any,
        alpha_plane_stride: Any,
        alpha_row_stride: Any,
        n_planes: Any,
        n_groups: Any,
        bytes_per_group: Any,
        y: Any,
        y_base: Any,
    ) -> Any:
        """32 rows of one token: ``y[y_base:+32] = Σ_g Σ_i α · Σ_k (table_lo[lo] + table_hi[hi])``.

        The tables' dtype picks the loop: float32 (``vpermps``) or int8 (``vpshufb``, with
        ``chunk_scales[chunk_base + chunk]`` the scale of each chunk of a group's bytes). All
        arrays are flat and C-contiguous; the ``*_base`` / ``*_stride`` arguments are element
        offsets. Codes of plane i, byte k: ``codes[code_base + i*code_plane_stride + 32k : +32]``;
        tables of byte k: ``tables[table_base + 32k : +32]`` (low-nibble table, then high).
        Scales in the layers' own order (``layout.LAYER_ORDER``): α of plane i, group g, the
        block's row r is ``first[first_base + r*alpha_row_stride + g]`` for plane 0 (α₁, per
        scale set) and ``alpha[alpha_base + (i-1)*alpha_plane_stride + r*alpha_row_stride + g]``
        for i >= 1. Both loops apply a group's scales once per plane (after summing its bytes, or
        a chunk of them), so the 32 scalar loads that gather them cost little.
        """
        sig = types.void(
            tables, table_base, chunk_scales, chunk_base, codes, code_base, code_plane_stride,
            first, first_base, alpha, alpha_base, alpha_plane_stride, alpha_row_stride,
            n_planes, n_groups, bytes_per_group, y, y_base,
        )  # fmt: skip
        # float32 tables, int8 levels, or int16 levels split into bytes (stored as uint8).
        table_kind = {types.int8: "int8", types.uint8: "int16"}.get(tables.dtype, "float32")

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            tables_ptr, chunk_scales_ptr, codes_ptr, first_ptr, alpha_ptr, y_ptr = (
                context.make_array(signature.args[p])(context, builder, args[p]).data
                for p in (0, 2, 4, 7, 9, 16)
            )
            intp = context.get_value_type(types.intp)

            def as_intp(value: Any) -> Any:
                return builder.sext(value, intp) if value.type.width < intp.width else value

            (table_base, chunk_base, code_base, code_plane_stride, first_base, alpha_base,
             alpha_plane_stride, alpha_row_stride, n_planes, n_groups, bytes_per_group,
             y_base) = (
                as_intp(args[i]) for i in (1, 3, 5, 6, 8, 10, 11, 12, 13, 14, 15, 17)
            )  # fmt: skip

            def const(value: int) -> Any:
                return ir.Constant(intp, value)

            def load(pointer: Any, index: Any, vector_type: Any) -> Any:
                address = builder.bitcast(builder.gep(pointer, [index]), vector_type.as_pointer())
                return builder.load(address, align=1)

            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VEC, [_VEC, _VEC, _VEC]), "llvm.fma.v8f32"
            )

            def scale_address(plane: Any, g: Any) -> Any:
                # Plane 0 (α₁) from its scale set, the other planes from the shared scales:
                # a mixed-task batch reads every set's α₁ but the rest only once.
                rest_index = builder.add(
                    builder.add(
                        alpha_base, builder.mul(builder.sub(plane, const(1)), alpha_plane_stride)
                    ),
                    g,
                )
                first_address = builder.gep(first_ptr, [builder.add(first_base, g)])
                rest_address = builder.gep(alpha_ptr, [rest_index])
                is_first = builder.icmp_unsigned("==", plane, const(0))
                return builder.select(is_first, first_address, rest_address)

            def scale_vector(address: Any, part: int) -> Any:
                # Rows 8·part .. 8·part+7 of the block, one scalar load each (row stride G).
                vector = ir.Constant(_VEC, None)
                for lane in range(LANES):
                    row = builder.mul(const(LANES * part + lane), alpha_row_stride)
                    value = builder.load(builder.gep(address, [row]))
                    vector = builder.insert_element(vector, value, ir.Constant(_I32, lane))
                return vector

            # One accumulator per 8 rows; allocas in the entry block become registers.
            sums = [cgutils.alloca_once(builder, _VEC) for _ in range(ROWS // LANES)]
            for total in sums:
                builder.store(ir.Constant(_VEC, None), total)
            operands = (
                builder, const, load, fma, scale_address, scale_vector, sums,
                tables_ptr, table_base, chunk_scales_ptr, chunk_base, codes_ptr, code_base,
                code_plane_stride, n_planes, n_groups, bytes_per_group,
            )  # fmt: skip
            if table_kind == "float32":
                _float_loop(*operands)
            else:
                _integer_loop(*operands, split=table_kind == "int16")
            for part, total in enumerate(sums):
                index = builder.add(y_base, const(LANES * part))
                out = builder.bitcast(builder.gep(y_ptr, [index]), _VEC.as_pointer())
                builder.store(builder.load(total), out, align=1)
            return context.get_dummy_value()

        return sig, codegen

    def _float_loop(
        builder: Any,
        const: Any,
        load: Any,
        fma: Any,
        scale_address: Any,
        scale_vector: Any,
        sums: list[Any],
        tables_ptr: Any,
        table_base: Any,
        chunk_scales_ptr: Any,
        chunk_base: Any,
        codes_ptr: Any,
        code_base: Any,
        code_plane_stride: Any,
        n_planes: Any,
        n_groups: Any,
        bytes_per_group: Any,
    ) -> None:
        """float32 tables: ``sums[part] += α · (table_lo[lo] + table_hi[hi])``, 8 rows a part."""
        permute = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VEC, [_VEC, _IVEC]), "llvm.x86.avx2.permps"
        )
        sign_bit = ir.Constant(_IVEC, [-(2**31)] * LANES)
        low_sign_shift = ir.Constant(_IVEC, [28] * LANES)  # the low nibble's bit 3 -> bit 31
        nibble_shift = ir.Constant(_IVEC, [4] * LANES)

        def lookup(table: Any, index: Any, sign_bits: Any) -> Any:
            # Mirrored nibbles: vpermps reads the low 3 bits, bit 3 (in sign_bits' sign) negates.
            value = builder.bitcast(builder.call(permute, [table, index]), _IVEC)
            return builder.bitcast(builder.xor(value, builder.and_(sign_bits, sign_bit)), _VEC)

        # A group's lookups summed per plane (one accumulator per 8 rows), then scaled once.
        partials = [cgutils.alloca_once(builder, _VEC) for _ in sums]
        with cgutils.for_range(builder, n_groups) as group_loop:
            g = group_loop.index
            with cgutils.for_range(builder, n_planes) as plane_loop:
                plane = plane_loop.index
                for partial in partials:
                    builder.store(ir.Constant(_VEC, None), partial)
                plane_codes = builder.add(code_base, builder.mul(plane, code_plane_stride))
                with cgutils.for_range(builder, bytes_per_group) as byte_loop:
                    k = builder.add(builder.mul(g, bytes_per_group), byte_loop.index)
                    table = builder.add(table_base, builder.mul(k, const(32)))
                    low_table = load(tables_ptr, table, _VEC)  # entries 0-7 of the low table
                    high_table = load(tables_ptr, builder.add(table, const(16)), _VEC)
                    code_index = builder.add(plane_codes, builder.mul(k, const(ROWS)))
                    for part, partial in enumerate(partials):
                        at = builder.add(code_index, const(LANES * part))
                        # Sign-extended: bit 7 (the high nibble's bit 3) is the sign bit.
                        index = builder.sext(load(codes_ptr, at, _CODES8), _IVEC)
                        low = lookup(low_table, index, builder.shl(index, low_sign_shift))
                        high = lookup(high_table, builder.lshr(index, nibble_shift), index)
                        both = builder.fadd(low, high)
                        builder.store(builder.fadd(builder.load(partial), both), partial)
                address = scale_address(plane, g)
                for part, (partial, total) in enumerate(zip(partials, sums, strict=True)):
                    scale = scale_vector(address, part)
                    builder.store(
                        builder.call(fma, [scale, builder.load(partial), builder.load(total)]),
                        total,
                    )

    def _integer_loop(
        builder: Any,
        const: Any,
        load: Any,
        fma: Any,
        scale_address: Any,
        scale_vector: Any,
        sums: list[Any],
        tables_ptr: Any,
        table_base: Any,
        chunk_scales_ptr: Any,
        chunk_base: Any,
        codes_ptr: Any,
        code_base: Any,
        code_plane_stride: Any,
        n_planes: Any,
        n_groups: Any,
        bytes_per_group: Any,
        split: bool,
    ) -> None:
        """Integer tables: per chunk and plane, int16 sums of 32 rows' lookups, then ``α · s ·``.

        int8 (``split`` False): one table of 16 levels per nibble. int16 (``split`` True): the
        levels' low bytes (unsigned) and high bytes (signed) in two tables each, looked up and
        summed apart; a chunk's sum is ``256 · Σ high + Σ low``.
        """
        module = builder.module
        shuffle_bytes = cgutils.get_or_insert_function(
            module, ir.FunctionType(_BYTES, [_BYTES, _BYTES]), "llvm.x86.avx2.pshuf.b"
        )
        # vpmaddubsw: unsigned bytes of the first operand times signed bytes of the second.
        pair_sums = cgutils.get_or_insert_function(
            module, ir.FunctionType(_WORDS, [_BYTES, _BYTES]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        low_nibble = ir.Constant(_BYTES, [15] * ROWS)
        ones = ir.Constant(_BYTES, [1] * ROWS)
        nibble_shift = ir.Constant(_WORDS, [4] * 16)
        both_lanes = _shuffle_mask(list(range(16)) * 2)
        # Byte sets looked up per code byte: (table offset, signed). The signed set's pairs go to
        # vpmaddubsw's signed operand, the unsigned (low bytes of int16 levels) to its other.
        byte_sets = [(0, False), (32, True)] if split else [(0, True)]
        table_stride = const(32 * len(byte_sets))
        chunk_bytes = CHUNK_BYTES_INT16 if split else CHUNK_BYTES
        # int16 sums per byte set: words[set][0] holds rows 0-7 | 16-23, [1] rows 8-15 | 24-31.
        words = [[cgutils.alloca_once(builder, _WORDS) for _ in range(2)] for _ in byte_sets]
        chunk = const(chunk_bytes)
        chunks_per_group = builder.udiv(builder.add(bytes_per_group, const(chunk_bytes - 1)), chunk)
        high_weight = ir.Constant(_VEC, [256.0] * LANES)

        with cgutils.for_range(builder, n_groups) as group_loop:
            g = group_loop.index
            with cgutils.for_range(builder, chunks_per_group) as chunk_loop:
                c = chunk_loop.index
                done = builder.mul(c, chunk)
                left = builder.sub(bytes_per_group, done)
                count = builder.select(builder.icmp_unsigned("<", left, chunk), left, chunk)
                begin = builder.add(builder.mul(g, bytes_per_group), done)
                scale_index = builder.add(
                    chunk_base, builder.add(builder.mul(g, chunks_per_group), c)
                )
                table_scale = builder.load(builder.gep(chunk_scales_ptr, [scale_index]))
                table_scales = builder.insert_element(
                    ir.Constant(_VEC, None), table_scale, ir.Constant(_I32, 0)
                )
                table_scales = builder.shuffle_vector(
                    table_scales, table_scales, _shuffle_mask([0] * LANES)
                )
                with cgutils.for_range(builder, n_planes) as plane_loop:
                    plane = plane_loop.index
                    for word in (w for pair in words for w in pair):
                        builder.store(ir.Constant(_WORDS, None), word)
                    with cgutils.for_range(builder, count) as byte_loop:
                        k = builder.add(begin, byte_loop.index)
                        code_index = builder.add(
                            builder.add(code_base, builder.mul(plane, code_plane_stride)),
                            builder.mul(k, const(ROWS)),
                        )
                        code = load(codes_ptr, code_index, _BYTES)
                        low = builder.and_(code, low_nibble)
                        shifted = builder.lshr(builder.bitcast(code, _WORDS), nibble_shift)
                        high = builder.and_(builder.bitcast(shifted, _BYTES), low_nibble)
                        table = builder.add(table_base, builder.mul(k, table_stride))
                        for (offset, signed), set_words in zip(byte_sets, words, strict=True):
                            at = builder.add(table, const(offset))
                            low_table, high_table = (
                                builder.shuffle_vector(t, t, both_lanes)
                                for t in (
                                    load(tables_ptr, at, _TABLE8),
                                    load(tables_ptr, builder.add(at, const(16)), _TABLE8),
                                )
                            )
                            low_values = builder.call(shuffle_bytes, [low_table, low])
                            high_values = builder.call(shuffle_bytes, [high_table, high])
                            for word, mask in zip(
                                set_words, (_UNPACK_LOW, _UNPACK_HIGH), strict=True
                            ):
                                pairs = builder.shuffle_vector(low_values, high_values, mask)
                                operands = [ones, pairs] if signed else [pairs, ones]
                                summed = builder.call(pair_sums, operands)
                                builder.store(builder.add(builder.load(word), summed), word)
                    address = scale_address(plane, g)

                    def rows_of(word: Any, part: int) -> Any:
                        # part p holds rows 8p..8p+7: words[p % 2], 128-bit lane p // 2.
                        half = builder.shuffle_vector(
                            builder.load(word),
                            ir.Constant(_WORDS, None),
                            _shuffle_mask(list(range(8 * (part // 2), 8 * (part // 2) + 8))),
                        )
                        return builder.sitofp(builder.sext(half, _IVEC), _VEC)

                    for part, total in enumerate(sums):
                        values = rows_of(words[-1][part % 2], part)
                        if split:  # 256 · Σ high + Σ low (exact in float32: |sum| < 2^23)
                            values = builder.call(
                                fma, [high_weight, values, rows_of(words[0][part % 2], part)]
                            )
                        scale = builder.fmul(scale_vector(address, part), table_scales)
                        builder.store(
                            builder.call(fma, [scale, values, builder.load(total)]), total
                        )

    # The 8 entries of a quad's table with input 3 negative, as bits of the entry index: entry j
    # is -Σx + 2·Σ_{b in j} x_b (b = 0, 1, 2); entries 8..15 are their negatives (odd table).
    _ENTRY_BITS = [[float(j >> b & 1) for j in range(LANES)] for b in range(3)]

    @intrinsic
    def _quad_levels(typingctx: Any, x: Any, x_at: Any, inverse: Any, levels: Any, at: Any) -> Any:
        """One quad's 16 table levels, in the kernel's mirrored nibble order, from its 4 inputs
        ``x[x_at : x_at + 4]``: ``levels[at : at + 16]`` (int8), or their low bytes there and
        their high bytes at ``at + 32`` (int16 levels split, ``levels`` uint8).

        Entries 0-7 are summed as ``lut.build_tables`` sums them (the same float32
        values), then ``clamp(rint(entry · inverse))``; mirrored nibble ``8 + j`` reads
        ``table[15 - j] = -table[j]``, so levels 8-15 are levels 0-7 negated.
        """
        split = levels.dtype == types.uint8
        top = 32767 if split else 127
        sig = types.void(x, x_at, inverse, levels, at)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            x_ptr, levels_ptr = (
                context.make_array(signature.args[p])(context, builder, args[p]).data
                for p in (0, 3)
            )
            x_at, at = args[1], args[4]
            values = [
                builder.load(builder.gep(x_ptr, [builder.add(x_at, ir.Constant(x_at.type, b))]))
                for b in range(4)
            ]

            def splat(value: Any) -> Any:
                vector = builder.insert_element(ir.Constant(_VEC, None), value, _I32(0))
                return builder.shuffle_vector(vector, vector, _shuffle_mask([0] * LANES))

            total = builder.fsub(ir.Constant(_F32, 0.0), values[0])
            for value in values[1:]:
                total = builder.fsub(total, value)
            entries = splat(total)
            two = ir.Constant(_F32, 2.0)
            for b in range(3):  # adding 0 leaves an entry exact: the same sums as build_tables
                step = builder.fmul(splat(builder.fmul(two, values[b])), _VEC(_ENTRY_BITS[b]))
                entries = builder.fadd(entries, step)
            rint = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VEC, [_VEC]), "llvm.rint.v8f32"
            )
            scaled = builder.call(rint, [builder.fmul(entries, splat(args[2]))])
            ints = builder.fptosi(scaled, _IVEC)
            high_limit, low_limit = _IVEC([top] * LANES), _IVEC([-top] * LANES)
            ints = builder.select(builder.icmp_signed(">", ints, high_limit), high_limit, ints)
            ints = builder.select(builder.icmp_signed("<", ints, low_limit), low_limit, ints)
            both = builder.shuffle_vector(
                ints, builder.sub(_IVEC(None), ints), _shuffle_mask(list(range(2 * LANES)))
            )
            as_bytes = ir.VectorType(_I8, 2 * LANES)

            def store(vector: Any, offset: int) -> None:
                index = builder.add(at, ir.Constant(at.type, offset))
                address = builder.bitcast(builder.gep(levels_ptr, [index]), as_bytes.as_pointer())
                builder.store(builder.trunc(vector, as_bytes), address, align=1)

            store(both, 0)
            if split:
                shift = ir.Constant(both.type, [8] * 2 * LANES)
                store(builder.ashr(both, shift), 32)
            return context.get_dummy_value()

        return sig, codegen

    @njit(cache=True)
    def _integer_tables(
        x, group_size, bytes_per_group, split, levels, chunk_scales, group_sums, with_sums,
        first_token, last_token,
    ):  # pragma: no cover - numba  # fmt: skip
        """Integer tables of tokens ``first_token..last_token-1``, straight from x, one scale per
        token and chunk of a group's bytes (``CHUNK_BYTES`` for int8, ``CHUNK_BYTES_INT16`` for
        int16).

        int8 (``split`` False, ``levels`` int8): ``levels[t, 32k : +32]`` holds code byte k's
        two tables (low nibble's, then high's). int16 (``split``, ``levels`` uint8):
        ``levels[t, 64k : +64]`` holds their low bytes, then their high bytes. group_sums
        (T, G) <- Σ x per group when ``with_sums``. A chunk's scale is its largest table entry
        over the top level; the largest entry of a quad's table is Σ|x| (all signs matching).
        """
        in_features = x.shape[1]
        width = 64 if split else 32  # level bytes per code byte
        n_bytes = levels.shape[1] // width
        chunk_bytes = CHUNK_BYTES_INT16 if split else CHUNK_BYTES
        top = np.float32(32767.0) if split else np.float32(127.0)
        chunks_per_group = (bytes_per_group + chunk_bytes - 1) // chunk_bytes
        tail = np.zeros(4, np.float32)  # a partial last quad (in_features % 4), zero-padded
        flat_levels = levels.reshape(-1)
        for t in range(first_token, last_token):
            row = x[t]
            for g in range(n_bytes // bytes_per_group):
                for c in range(chunks_per_group):
                    first = g * bytes_per_group + c * chunk_bytes
                    last = min((g + 1) * bytes_per_group, first + chunk_bytes)
                    largest = np.float32(0.0)
                    finite = True
                    for q in range(2 * first, 2 * last):
                        total = np.float32(0.0)
                        for i in range(4 * q, min(4 * q + 4, in_features)):
                            total += abs(row[i])
                        if total > largest:
                            largest = total
                        elif np.isnan(total):
                            finite = False
                    at = g * chunks_per_group + c
                    if largest == 0 or not finite or largest == np.inf:
                        # All zero: exact. NaN or inf in x: the chunk's sums become NaN, as in
                        # float32 (levels cannot hold them).
                        zero = largest == 0 and finite
                        chunk_scales[t, at] = np.float32(0.0) if zero else np.float32(np.nan)
                        levels[t, width * first : width * last] = 0
                        continue
                    chunk_scales[t, at] = largest / top
                    inverse = top / largest
                    for q in range(2 * first, 2 * last):
                        # Quad q is code byte q // 2's low (even q) or high nibble's table.
                        out_at = t * levels.shape[1] + width * (q // 2) + 16 * (q % 2)
                        if 4 * q + 4 <= in_features:
                            _quad_levels(row, 4 * q, inverse, flat_levels, out_at)
                        else:
                            tail[:] = 0
                            for i in range(4 * q, in_features):
                                tail[i - 4 * q] = row[i]
                            _quad_levels(tail, 0, inverse, flat_levels, out_at)
            if with_sums:
                for g in range(group_sums.shape[1]):
                    total = np.float32(0.0)
                    for i in range(g * group_size, (g + 1) * group_size):
                        total += row[i]
                    group_sums[t, g] = total

    @njit(parallel=True, cache=True)
    def _integer_tables_parallel(
        x, group_size, bytes_per_group, split, levels, chunk_scales, group_sums, with_sums,
        threads,
    ):  # pragma: no cover - numba  # fmt: skip
        """``_integer_tables`` of every token, the tokens split over ``threads`` tasks (numba's
        thread count, which the caller sets: numba cannot cache a function that reads it)."""
        n_tokens = x.shape[0]
        n_tasks = min(n_tokens, threads)
        for task in prange(n_tasks):
            _integer_tables(
                x, group_size, bytes_per_group, split, levels, chunk_scales, group_sums,
                with_sums, task * n_tokens // n_tasks, (task + 1) * n_tokens // n_tasks,
            )  # fmt: skip

    @njit(cache=True)
    def _fill_tables(
        x, group_size, n_groups, bytes_per_group, split, levels, with_sums, threads
    ):  # pragma: no cover - numba  # fmt: skip
        """Fill ``levels`` (see ``_integer_tables``; T rows) with x's integer tables and return
        ``(chunk_scales, group_sums)``. ``threads`` > 1 splits the tokens over numba's threads
        (as many as the caller set)."""
        n_tokens = x.shape[0]
        chunk_bytes = CHUNK_BYTES_INT16 if split else CHUNK_BYTES
        chunks = n_groups * ((bytes_per_group + chunk_bytes - 1) // chunk_bytes)
        chunk_scales = np.empty((n_tokens, chunks), np.float32)
        group_sums = np.empty((n_tokens, n_groups), np.float32)
        if threads > 1 and n_tokens > 1:
            _integer_tables_parallel(
                x, group_size, bytes_per_group, split, levels, chunk_scales, group_sums,
                with_sums, threads,
            )  # fmt: skip
        else:
            _integer_tables(
                x, group_size, bytes_per_group, split, levels, chunk_scales, group_sums,
                with_sums, 0, n_tokens,
            )  # fmt: skip
        return chunk_scales, group_sums

    @njit(cache=True)
    def _row_blocks(
        tables,
        chunk_scales,
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
        scales_width = chunk_scales.shape[1]
        bits, n_blocks, n_bytes, _ = codes.shape
        out = n_blocks * ROWS
        plane_width = n_groups * out  # scales of one plane or set: (padded out, G)
        block_width = n_groups * ROWS
        flat_tables, flat_chunk_scales, flat_codes, flat_first, flat_rest, flat_y = (
            tables.reshape(-1),
            chunk_scales.reshape(-1),
            codes.reshape(-1),
            first_scales.reshape(-1),
            rest_scales.reshape(-1),
            y.reshape(-1),
        )
        for block in range(first, last):
            for t in range(n_tokens):
                _row_block_dot(
                    flat_tables, t * table_width, flat_chunk_scales, t * scales_width,
                    flat_codes, block * n_bytes * ROWS, n_blocks * n_bytes * ROWS,
                    flat_first, token_set[t] * plane_width + block * block_width,
                    flat_rest, block * block_width, plane_width, n_groups,
                    bits, n_groups, bytes_per_group,
                    flat_y, t * out + block * ROWS,
                )  # fmt: skip

    @njit(parallel=True, cache=True)
    def _row_blocks_parallel(
        tables, chunk_scales, codes, first_scales, rest_scales, token_set, n_groups,
        bytes_per_group, threads, y,
    ):  # pragma: no cover - numba  # fmt: skip
        # One contiguous run of row blocks per thread: even shares (a layer of 18 blocks in
        # tasks of 4 gave one of two threads 12), and each block's codes stay in L1 while the
        # tokens pass.
        n_blocks = codes.shape[1]
        n_tasks = min(n_blocks, threads)  # the caller set numba's threads to this
        for task in prange(n_tasks):
            _row_blocks(
                tables, chunk_scales, codes, first_scales, rest_scales, token_set, n_groups,
                bytes_per_group, task * n_blocks // n_tasks, (task + 1) * n_blocks // n_tasks, y,
            )  # fmt: skip

    @njit(inline="always")
    def _run_blocks(
        tables, chunk_scales, codes, first_scales, rest_scales, token_set, n_groups,
        bytes_per_group, threads, y,
    ):  # pragma: no cover - numba  # fmt: skip
        if threads > 1:
            _row_blocks_parallel(
                tables, chunk_scales, codes, first_scales, rest_scales, token_set, n_groups,
                bytes_per_group, threads, y,
            )  # fmt: skip
        else:
            _row_blocks(
                tables, chunk_scales, codes, first_scales, rest_scales, token_set, n_groups,
                bytes_per_group, 0, codes.shape[1], y,
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
        table_bits,
        threads,
    ):  # pragma: no cover - numba
        """The whole matmul in one call (a decode step calls this ~200 times per token on a small
        model). ``table_bits`` picks the tables: 0 float32, 16 or 8 integer levels (``TABLE_BITS``);
        ``threads`` > 1 splits the work over that many of numba's threads (the caller sets numba's
        thread count to it)."""
        n_tokens = x.shape[0]
        _, n_blocks, n_bytes, _ = codes.shape
        y = np.empty((n_tokens, n_blocks * ROWS), np.float32)
        if table_bits == 0:
            tables = np.empty((n_tokens, 32 * n_bytes), np.float32)
            group_sums = np.empty((n_tokens, n_groups), np.float32)
            build_tables(x, group_size, tables, group_sums, with_offset)
            no_scales = np.zeros((1, 1), np.float32)  # float32 tables have no chunk scales
            _run_blocks(
                tables, no_scales, codes, first_scales, rest_scales, token_set, n_groups,
                bytes_per_group, threads, y,
            )  # fmt: skip
        elif table_bits == 8:
            levels = np.empty((n_tokens, 32 * n_bytes), np.int8)
            chunk_scales, group_sums = _fill_tables(
                x, group_size, n_groups, bytes_per_group, False, levels, with_offset, threads
            )
            _run_blocks(
                levels, chunk_scales, codes, first_scales, rest_scales, token_set, n_groups,
                bytes_per_group, threads, y,
            )  # fmt: skip
        else:
            split_levels = np.empty((n_tokens, 64 * n_bytes), np.uint8)
            chunk_scales, group_sums = _fill_tables(
                x, group_size, n_groups, bytes_per_group, True, split_levels, with_offset,
                threads,
            )  # fmt: skip
            _run_blocks(
                split_levels, chunk_scales, codes, first_scales, rest_scales, token_set,
                n_groups, bytes_per_group, threads, y,
            )  # fmt: skip
        if with_offset:
            add_offset(y, offset, group_sums)
        return y

    # The njit core, public for native callers (``native`` calls it from its own numba
    # step, with no Python between layers): ``decode_native(x (T, in) float32 C, group_size,
    # codes, first, rest, token_set (T,) int64, offset, with_offset, n_groups, bytes_per_group,
    # table_bits, threads) -> y (T, padded out)``, the operands as ``layout.layer_operands``
    # gives them. Same function as ``decoder`` calls, so the same results.
    decode_native = _decode
    # For native callers that build one input's tables once for several layers (the engine's q,
    # k and v): ``fill_tables_native(x, group_size, n_groups, bytes_per_group, split, levels,
    # with_sums, threads) -> (chunk_scales, group_sums)`` fills integer tables (see
    # ``_integer_tables``), and ``row_blocks_native(tables, chunk_scales, codes, first, rest,
    # token_set, n_groups, bytes_per_group, first_block, last_block, y)`` runs a layer's row
    # blocks first_block..last_block-1 into y (T, padded out).
    fill_tables_native = _fill_tables
    row_blocks_native = _row_blocks
