"""Dequantization into bfloat16 with ``vpermw`` (AVX-512BW): 32 weights per table lookup.

The fast path of ``dequant.dequantize`` for bfloat16 outputs (its contract and layout). A row's
weights in one group take at most ``2^q`` values, ``offset ± α_1 ± ... ± α_q``: this path
computes those values once per (row, group), rounded to bfloat16 (the same float32 sums, in the
same order, as the generic loop, so the results are bit-identical), and keeps them as a 32-entry
table of 16-bit words in one 512-bit register. For 32 consecutive weights of a row it reads 4 code
bytes of every plane, makes plane i's 32 bits into bit i of 32 word indices, and one ``vpermw``
looks all 32 weights up, stored with one 64-byte write. Per 32 weights of a 3-bit layer: 12 byte
loads, ~10 vector instructions, against ~100 for the generic loop (the sums of every plane, then
the rounding). Needs AVX-512BW (``available()``) and ``q <= 5`` (32 table entries); the generic
loop does the rest: tails of fewer than 4 code bytes, and other CPUs.
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

MAX_BITS = 5  # 2^5 = 32 table entries, one 512-bit register of 16-bit words
WORDS = 32  # weights per lookup: 4 code bytes


def available() -> bool:
    """True when numba imports and this CPU has AVX-512BW (``vpermw``)."""
    return IMPORT_ERROR is None and _host_has_avx512bw()


@functools.cache
def _host_has_avx512bw() -> bool:
    return bool(llvm_binding.get_host_cpu_features().get("avx512bw", False))


if IMPORT_ERROR is None:
    from alphatune_runtime.dequant import bfloat16_bits

    _I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    _WORDS_VEC = ir.VectorType(_I16, WORDS)
    _MASK = ir.VectorType(ir.IntType(1), WORDS)

    @intrinsic
    def _lookup32(
        typingctx: Any, codes: Any, code_at: Any, byte_stride: Any, plane_stride: Any,
        n_planes: Any, inverse: Any, table: Any, out: Any, out_at: Any,
    ) -> Any:  # fmt: skip
        """``out[out_at : +32] = table[index]`` with index bit i = the code bits of plane i.

        Plane i's 4 code bytes are ``codes[code_at + i*plane_stride + j*byte_stride]``, j = 0..3
        (mapped through ``inverse``), little end first: bit b of byte j is weight 8j + b.
        """
        sig = types.void(
            codes, code_at, byte_stride, plane_stride, n_planes, inverse, table, out, out_at
        )

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
                builder.module,
                ir.FunctionType(_WORDS_VEC, [_WORDS_VEC, _WORDS_VEC]),
                "llvm.x86.avx512.permvar.hi.512",
            )
            index = cgutils.alloca_once(builder, _WORDS_VEC)
            builder.store(ir.Constant(_WORDS_VEC, None), index)
            with cgutils.for_range(builder, n_planes) as plane_loop:
                plane = plane_loop.index
                base = builder.add(code_at, builder.mul(plane, plane_stride))
                word = ir.Constant(_I32, 0)
                for j in range(4):
                    at = builder.add(base, builder.mul(ir.Constant(intp, j), byte_stride))
                    stored = builder.load(builder.gep(codes_ptr, [at]))
                    byte = builder.load(builder.gep(inverse_ptr, [builder.zext(stored, intp)]))
                    shifted = builder.shl(builder.zext(byte, _I32), ir.Constant(_I32, 8 * j))
                    word = builder.or_(word, shifted)
                bits = builder.bitcast(word, _MASK)
                weight = builder.shl(ir.Constant(_I16, 1), builder.trunc(plane, _I16))  # 1 << plane
                weights = builder.insert_element(
                    ir.Constant(_WORDS_VEC, None), weight, ir.Constant(_I32, 0)
                )
                weights = builder.shuffle_vector(
                    weights, weights, ir.Constant(ir.VectorType(_I32, WORDS), [0] * WORDS)
                )
                chosen = builder.select(bits, weights, ir.Constant(_WORDS_VEC, None))
                builder.store(builder.or_(builder.load(index), chosen), index)
            table_vec = builder.load(builder.bitcast(table_ptr, _WORDS_VEC.as_pointer()), align=2)
            # vpermw: result word k = table word index[k] (the data first, then the indices).
            looked_up = builder.call(permute, [table_vec, builder.load(index)])
            target = builder.bitcast(builder.gep(out_ptr, [out_at]), _WORDS_VEC.as_pointer())
            builder.store(looked_up, target, align=2)
            return context.get_dummy_value()

        return sig, codegen

    @njit(parallel=True, cache=True)
    def dequantize_bfloat16(
        codes, inverse, first, rest, offset, with_offset, bytes_per_group, out
    ):  # pragma: no cover - numba
        """``dequant.dequantize`` into bfloat16 bits ``out`` (out, in) uint16, C-contiguous."""
        bits, blocks, n_bytes, rows = codes.shape
        out_features, n_groups = first.shape
        width = out.shape[1]
        flat_codes = codes.reshape(-1)
        flat_out = out.reshape(-1)
        plane_stride = blocks * n_bytes * rows
        levels = 1 << bits
        for block in prange(blocks):
            table = np.zeros(WORDS, np.uint16)
            for r in range(min(rows, out_features - block * rows)):
                row = block * rows + r
                for g in range(n_groups):
                    shift = offset[row, g] if with_offset else np.float32(0.0)
                    for c in range(levels):
                        value = shift
                        for i in range(bits):
                            a = first[row, g] if i == 0 else rest[i - 1, row, g]
                            value += a if (c >> i) & 1 else -a
                        table[c] = bfloat16_bits(value)
                    begin, end = g * bytes_per_group, min(n_bytes, (g + 1) * bytes_per_group)
                    k = begin
                    while k + 4 <= end and 8 * (k + 4) <= width:
                        code_at = (block * n_bytes + k) * rows + r
                        _lookup32(flat_codes, code_at, rows, plane_stride, bits, inverse, table,
                                  flat_out, row * width + 8 * k)  # fmt: skip
                        k += 4
                    if begin + 4 <= k < end and 8 * end <= width:
                        # The group's last 1-3 bytes: one more lookup of its last 4, rewriting
                        # up to 24 weights just written with the same values (same table). The
                        # 576-wide layers' groups of 144 (18 bytes) end this way; one weight at a
                        # time below, their tails took as long as the rest of the group.
                        code_at = (block * n_bytes + end - 4) * rows + r
                        _lookup32(flat_codes, code_at, rows, plane_stride, bits, inverse, table,
                                  flat_out, row * width + 8 * (end - 4))  # fmt: skip
                        k = end
                    for kk in range(k, end):  # the group's last bytes, one weight at a time
                        for b in range(min(8, width - 8 * kk)):
                            c = 0
                            for i in range(bits):
                                byte = inverse[codes[i, block, kk, r]]
                                c |= ((byte >> b) & 1) << i
                            out[row, 8 * kk + b] = table[c]
