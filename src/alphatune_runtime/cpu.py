"""What this CPU computes natively, beyond the LUT kernels' own checks (``avx2``, ``avx512``).

One owner of the bfloat16 question: the engine's prefill GEMMs and the quantizer's
Hessian-recording pass both take bfloat16 inputs only where the CPU multiplies them natively
(elsewhere oneDNN emulates bfloat16, slower than float32).
"""

from __future__ import annotations

import functools


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), so oneDNN's bf16
    GEMM beats float32 rather than emulating it. False where llvmlite (numba's, the optional
    ``fast`` extra) is not installed to ask: the float32 paths are the safe answer."""
    try:
        import llvmlite.binding as llvm_binding
    except ImportError:
        return False
    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("avx512bf16", False) or features.get("amx-bf16", False))
