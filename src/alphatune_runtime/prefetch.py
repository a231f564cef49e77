"""Software prefetch for numba kernels that stream a table row by row from memory.

A product with a table bigger than the caches (a decode step's LM head: 27 MiB for SmolLM2, 160
MiB for Gemma-3-270M, read once per token after the blocks pushed it out of the caches) waits
on memory more than it computes: the hardware prefetchers do not run far enough ahead of a loop
that does real work per byte. ``prefetch(array, index)`` asks for the cache line holding
``array[index]`` (LLVM's ``llvm.prefetch``: a read, kept in all cache levels; on x86
``prefetcht0``, on ARM ``prfm``), so a kernel can request the rows it will read next while it
computes on the current one. A hint only: it never faults, and results do not change.

Numba's on-disk cache of a kernel that calls ``prefetch`` tracks the kernel's own file, not this
one: after editing this file, delete the ``__pycache__`` entries of the kernels that use it.
"""

from __future__ import annotations

from typing import Any

try:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    IMPORT_ERROR: ImportError | None = None
except ImportError as exc:  # numba is an optional dependency (extra "fast")
    IMPORT_ERROR = exc

LINE_BYTES = 64  # one prefetch per cache line

if IMPORT_ERROR is None:
    _I8_POINTER = ir.IntType(8).as_pointer()
    _I32 = ir.IntType(32)

    @intrinsic
    def prefetch(typingctx: Any, array: Any, index: Any) -> Any:
        """Prefetch the cache line of ``array[index]``: ``array`` 1-d and C-contiguous (the
        address is data + index, with no strides), ``index`` an integer. No bounds check: the
        caller keeps ``index`` inside the array."""
        one_d = isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
        if not (one_d and isinstance(index, types.Integer)):
            return None  # a typing error naming the arguments, not a failure in code generation
        sig = types.void(array, index)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            address = builder.bitcast(builder.gep(data, [args[1]]), _I8_POINTER)
            function = cgutils.get_or_insert_function(
                builder.module,
                ir.FunctionType(ir.VoidType(), [_I8_POINTER, _I32, _I32, _I32]),
                "llvm.prefetch.p0i8",
            )
            # (address, read = 0, locality 3 = keep in every level, data cache = 1)
            constants = [ir.Constant(_I32, value) for value in (0, 3, 1)]
            builder.call(function, [address, *constants])
            return context.get_dummy_value()

        return sig, codegen
