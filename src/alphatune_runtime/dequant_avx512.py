"""Dequantization by table lookups (AVX-512BW): 32 bfloat16 or 16 float32 weights per lookup.

The fast path of ``dequant.dequantize`` (its contract and layout). A row's weights in one group
take at most ``2^q`` values, ``offset ± α_1 ± ... ± α_q``: this path computes those values once
per (row, group) (the same float32 sums, in the same order, as the generic loop, so the results
are bit-identical; rounded to bfloat16 for a bfloat16 output) and keeps them as a table in one
512-bit register. For bfloat16 (``vpermw``: 32 entries of 16 bits, ``q <= 5``) it reads 4 code
bytes of every plane for 32 consecutive weights of a row, makes plane i's 32 bits into bit i of
32 word indices, and one ``vpermw`` looks all 32 weights up, stored with one 64-byte write. Per 32
weights of a 3-bit layer: 12 byte loads, ~10 vector instructions, against ~100 for the generic
loop. For float32 (``vpermps``: 16 entries of 32 bits, ``q <= 4``) the same with 2 code bytes
and 16 weights. Needs AVX-512BW (``available()``); the generic loop does the rest: groups
narrower than one lookup, a partial last code byte, more bits, and other CPUs.
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
    from numba.extending import intrinsic, overload

    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    IMPORT_ERROR = exc

MAX_BITS = 5  # 2^5 = 32 table entries, one 512-bit register of 16-bit words
WORDS = 32  # weights per lookup: 4 code bytes
MAX_BITS_FLOAT32 = 4  # float32: 2^4 = 16 entries in one register (``vpermps``)
FLOATS = 16  # float32 weights per lookup: 2 code bytes


def available() -> bool:
    """True when numba imports and this CPU has AVX-512BW (``vpermw``)."""
    return IMPORT_ERROR is None and _host_has_avx512bw()


@functools.cache
def _host_has_avx512bw() -> bool:
    from numba import config

    # numba compiling for another CPU (NUMBA_CPU_NAME, e.g. ``haswell`` to emulate an AVX2-only
    # machine in bench_prefill.py) has AVX-512BW only where its feature list says so.
    if config.CPU_NAME not in (None, "host"):
        return "+avx512bw" in (config.CPU_FEATURES or "")
    return bool(llvm_binding.get_host_cpu_features().get("avx512bw", False))


if IMPORT_ERROR is None:
    from alphatune_runtime.dequant import bfloat16_bits

    _I16, _I32 = ir.IntType(16), ir.IntType(32)
    _WORDS_VEC = ir.VectorType(_I16, WORDS)
    _FLOATS_VEC = ir.VectorType(ir.FloatType(), FLOATS)
    _LANES_I32 = ir.VectorType(_I32, FLOATS)

    def _codegen_lookup(lanes: int, lane: Any, table_type: Any, permute_name: str) -> Any:
        """The codegen of a lookup of ``lanes`` weights (``lanes / 8`` code bytes per plane):
        ``out[out_at : +lanes] = table[index]``, index bit i = the code bits of plane i, through
        the permute intrinsic ``permute_name`` (table first, then the indices)."""
        n_bytes = lanes // 8
        index_type = ir.VectorType(lane, lanes)
        word_type = ir.IntType(lanes)
        mask_type = ir.VectorType(ir.IntType(1), lanes)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            codes_ptr, inverse_ptr, table_ptr, out_ptr = (
                context.make_array(signature.args[p])(context, builder, args[p]).data
                for p in (0, 5, 6, 7)
            )
            intp = context.get_value_type(types.intp)

            def as_intp(value: Any) -> Any:
                return builder.sext(value, intp) if value.type.width < intp.width else value

            code_at, byte_stride, plane_stride, n_planes, out_at = (
                as_intp(args[i]) for i in (1, 2, 3, 4, 8)
            )
            permute = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(table_type, [table_type, index_type]), permute_name
            )
            index = cgutils.alloca_once(builder, index_type)
            builder.store(ir.Constant(index_type, None), index)
            with cgutils.for_range(builder, n_planes) as plane_loop:
                plane = plane_loop.index
                base = builder.add(code_at, builder.mul(plane, plane_stride))
                word = ir.Constant(word_type, 0)
                for j in range(n_bytes):
                    at = builder.add(base, builder.mul(ir.Constant(intp, j), byte_stride))
                    stored = builder.load(builder.gep(codes_ptr, [at]))
                    byte = builder.load(builder.gep(inverse_ptr, [builder.zext(stored, intp)]))
                    shifted = builder.shl(
                        builder.zext(byte, word_type), ir.Constant(word_type, 8 * j)
                    )
                    word = builder.or_(word, shifted)
                bits = builder.bitcast(word, mask_type)
                weight = builder.shl(ir.Constant(lane, 1), builder.trunc(plane, lane))  # 1 << plane
                weights = builder.insert_element(
                    ir.Constant(index_type, None), weight, ir.Constant(_I32, 0)
                )
                weights = builder.shuffle_vector(
                    weights, weights, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
                )
                chosen = builder.select(bits, weights, ir.Constant(index_type, None))
                builder.store(builder.or_(builder.load(index), chosen), index)
            table_vec = builder.load(builder.bitcast(table_ptr, table_type.as_pointer()), align=4)
            looked_up = builder.call(permute, [table_vec, builder.load(index)])
            target = builder.bitcast(builder.gep(out_ptr, [out_at]), table_type.as_pointer())
            builder.store(looked_up, target, align=4)
            return context.get_dummy_value()

        return codegen

    @intrinsic
    def _lookup32(
        typingctx: Any, codes: Any, code_at: Any, byte_stride: Any, plane_stride: Any,
        n_planes: Any, inverse: Any, table: Any, out: Any, out_at: Any,
    ) -> Any:  # fmt: skip
        """``out[out_at : +32] = table[index]`` (bfloat16 bits: ``vpermw``) with index bit i =
        the code bits of plane i. Plane i's 4 code bytes are ``codes[code_at + i*plane_stride +
        j*byte_stride]``, j = 0..3 (mapped through ``inverse``), little end first: bit b of byte
        j is weight 8j + b."""
        sig = types.void(
            codes, code_at, byte_stride, plane_stride, n_planes, inverse, table, out, out_at
        )
        return sig, _codegen_lookup(WORDS, _I16, _WORDS_VEC, "llvm.x86.avx512.permvar.hi.512")

    @intrinsic
    def _lookup16(
        typingctx: Any, codes: Any, code_at: Any, byte_stride: Any, plane_stride: Any,
        n_planes: Any, inverse: Any, table: Any, out: Any, out_at: Any,
    ) -> Any:  # fmt: skip
        """``_lookup32`` for float32: 16 weights (2 code bytes per plane) through ``vpermps``
        from a 16-entry float32 table."""
        sig = types.void(
            codes, code_at, byte_stride, plane_stride, n_planes, inverse, table, out, out_at
        )
        return sig, _codegen_lookup(FLOATS, _I32, _FLOATS_VEC, "llvm.x86.avx512.permvar.sf.512")

    def _lookup(codes, code_at, byte_stride, plane_stride, n_planes, inverse, table, out, out_at):
        """``_lookup32`` into bfloat16 bits (uint16 ``out``), ``_lookup16`` into float32."""

    @overload(_lookup, inline="always")
    def _lookup_overload(
        codes, code_at, byte_stride, plane_stride, n_planes, inverse, table, out, out_at
    ):  # fmt: skip
        lookup = _lookup32 if out.dtype == types.uint16 else _lookup16

        def call(codes, code_at, byte_stride, plane_stride, n_planes, inverse, table, out, out_at):
            lookup(codes, code_at, byte_stride, plane_stride, n_planes, inverse, table, out, out_at)

        return call

    def _entry(value, out):
        """A table entry of ``out``'s kind for the float32 sum ``value``."""

    @overload(_entry, inline="always")
    def _entry_overload(value, out):
        if out.dtype == types.uint16:
            return lambda value, out: bfloat16_bits(value)
        return lambda value, out: value

    def _lookup_bytes(out):
        """Code bytes per plane one lookup reads: 4 (32 bfloat16 words), 2 (16 floats)."""

    @overload(_lookup_bytes, inline="always")
    def _lookup_bytes_overload(out):
        n = WORDS // 8 if out.dtype == types.uint16 else FLOATS // 8
        return lambda out: n

    @njit(parallel=True, cache=True)
    def dequantize_lookup(
        codes, inverse, first, rest, offset, with_offset, bytes_per_group, out
    ):  # pragma: no cover - numba
        """``dequant.dequantize`` into ``out`` (out, in), C-contiguous: bfloat16 bits (uint16)
        through ``vpermw``, or float32 through ``vpermps``."""
        bits, blocks, n_bytes, rows = codes.shape
        out_features, n_groups = first.shape
        width = out.shape[1]
        flat_codes = codes.reshape(-1)
        flat_out = out.reshape(-1)
        plane_stride = blocks * n_bytes * rows
        levels = 1 << bits
        step = _lookup_bytes(out)
        for block in prange(blocks):
            table = np.zeros(WORDS, out.dtype)
            for r in range(min(rows, out_features - block * rows)):
                row = block * rows + r
                for g in range(n_groups):
                    shift = offset[row, g] if with_offset else np.float32(0.0)
                    for c in range(levels):
                        value = shift
                        for i in range(bits):
                            a = first[row, g] if i == 0 else rest[i - 1, row, g]
                            value += a if (c >> i) & 1 else -a
                        table[c] = _entry(value, out)
                    begin, end = g * bytes_per_group, min(n_bytes, (g + 1) * bytes_per_group)
                    k = begin
                    while k + step <= end and 8 * (k + step) <= width:
                        code_at = (block * n_bytes + k) * rows + r
                        _lookup(flat_codes, code_at, rows, plane_stride, bits, inverse, table,
                                flat_out, row * width + 8 * k)  # fmt: skip
                        k += step
                    if begin + step <= k < end and 8 * end <= width:
                        # The group's last bytes (fewer than a lookup's): one more lookup of its
                        # last ``step``, rewriting weights just written with the same values
                        # (same table). The 576-wide layers' groups of 144 (18 bytes) end this
                        # way; one weight at a time below, their tails took as long as the rest
                        # of the group.
                        code_at = (block * n_bytes + end - step) * rows + r
                        _lookup(flat_codes, code_at, rows, plane_stride, bits, inverse, table,
                                flat_out, row * width + 8 * (end - step))  # fmt: skip
                        k = end
                    for kk in range(k, end):  # the group's last bytes, one weight at a time
                        for b in range(min(8, width - 8 * kk)):
                            c = 0
                            for i in range(bits):
                                byte = inverse[codes[i, block, kk, r]]
                                c |= ((byte >> b) & 1) << i
                            out[row, 8 * kk + b] = table[c]
