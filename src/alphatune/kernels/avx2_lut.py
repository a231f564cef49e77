"""The AVX2 LUT kernel's torch face: BCQ decode by table lookup on AVX2 CPUs.

Same contract as ``alphatune.kernels.reference.bcq_matmul_reference`` (see ``bcq_matmul_lut``).
The kernel itself (algorithm, tables, layout, error bound) is ``alphatune_runtime.avx2``, which
takes numpy arrays; this module prepares a layer's operands from its tensors (``prepare_*``,
through ``lut_common``), checks them once (``decoder``) and converts each call's x and y.
``table_dtype`` names the tables: ``torch.float32`` (the default; exact up to summation order),
``torch.int16`` (within ~1e-4) or ``torch.int8`` (~1% RMS). The result comes back in x's dtype.
No autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from alphatune.errors import ConfigError, KernelUnavailableError
from alphatune.kernels import lut_common
from alphatune.kernels.lut_common import PreparedCodes, PreparedScales, supports
from alphatune.kernels.numba_threads import numba_threads, threads_for
from alphatune_runtime import avx2

__all__ = [
    "MIN_PARALLEL_WORK",
    "ROWS",
    "PreparedCodes",
    "PreparedScales",
    "available",
    "bcq_matmul_lut",
    "decoder",
    "lut_matmul",
    "prepare_codes",
    "prepare_scales",
    "supports",
]

ROWS = avx2.ROWS
SCALES_LAYOUT = lut_common.LAYER_ORDER  # how prepare_scales lays them out
CHUNK_BYTES, CHUNK_BYTES_INT16 = avx2.CHUNK_BYTES, avx2.CHUNK_BYTES_INT16
TABLE_DTYPES = (torch.float32, torch.int16, torch.int8)
# table_bits of the numba entries: 0 for float32 tables, else the levels' bits.
TABLE_BITS = dict(zip(TABLE_DTYPES, avx2.TABLE_BITS, strict=True))
MIN_PARALLEL_WORK = avx2.MIN_PARALLEL_WORK  # public: native callers (alphatune.engine) pick threads


def available() -> bool:
    """True when numba imports and this CPU has AVX2 and FMA (``alphatune_runtime.avx2``)."""
    return avx2.available()


# ----------------------------------------------------------------------------- python side


def _require() -> None:
    if avx2.IMPORT_ERROR is not None:
        raise KernelUnavailableError(
            "the AVX2 LUT kernel needs numba, which failed to import; "
            "install it with `pip install numba` (or `pip install alphatune[fast]`)"
        ) from avx2.IMPORT_ERROR
    if not available():
        raise KernelUnavailableError("the AVX2 LUT kernel needs a CPU with AVX2 and FMA")


def prepare_codes(packed: Tensor, in_features: int, out: np.ndarray | None = None) -> PreparedCodes:
    """Reorder packed codes ``(q, out, ceil(in/8))`` so 32 rows' bytes are contiguous; mirror
    the nibbles (see ``avx2.MIRRORED``). ``out``: where to write them (see ``lut_common``)."""
    return lut_common.prepare_codes(packed, in_features, ROWS, avx2.MIRRORED, out)


def prepare_scales(first_sets: Tensor, rest: Tensor) -> PreparedScales:
    """α₁ sets ``(S, out, G)`` and the other planes ``(q-1, out, G)`` in the kernel's layout: the
    layers' own order, views of the tensors when no row padding is needed (no copy)."""
    return lut_common.scales_in_layer_order(first_sets, rest, ROWS)


def decoder(
    prepared: PreparedCodes,
    scales: PreparedScales,
    offset: Tensor | None,
    group_size: int,
    table_dtype: torch.dtype = torch.float32,
) -> Callable[[Tensor, Tensor | None], Tensor]:
    """``decode(x, token_set=None) -> y``: ``lut_matmul`` for one layer, its checks done once.

    Layers keep this between decode steps (~200 calls per token on a small model): a call then
    only converts x and runs the kernel.
    """
    _require()
    if table_dtype not in TABLE_DTYPES:
        raise ConfigError(
            f"table_dtype must be torch.float32, torch.int16 or torch.int8, got {table_dtype}"
        )
    layer = lut_common.layer_operands(prepared, scales, offset, group_size, ROWS, SCALES_LAYOUT)
    table_bits = TABLE_BITS[table_dtype]

    def decode(x: Tensor, token_set: Tensor | None = None) -> Tensor:
        x_np, sets = lut_common.token_operands(x, token_set, layer)
        args = (
            x_np, group_size, layer.codes, layer.first, layer.rest, sets, layer.offset,
            layer.with_offset, layer.n_groups, layer.bytes_per_group, table_bits,
        )  # fmt: skip
        threads = threads_for(layer.work_per_token * x_np.shape[0], MIN_PARALLEL_WORK)
        if threads == 1:
            y = avx2.decode_native(*args, 1)
        else:
            with numba_threads(threads):
                y = avx2.decode_native(*args, threads)
        return torch.from_numpy(y[:, : layer.out_features])

    return decode


def lut_matmul(
    x: Tensor,
    prepared: PreparedCodes,
    scales: PreparedScales,
    offset: Tensor | None,
    token_set: Tensor | None,
    group_size: int,
    table_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``y (T, out)`` float32 for ``x (T, in)``: token t uses scale set ``token_set[t]`` (default 0).

    ``prepared`` and ``scales`` come from ``prepare_codes`` and ``prepare_scales``; ``offset``
    ``(out, G)`` adds ``offset · Σx`` per group; no bias. ``table_dtype``: ``torch.float32`` (exact
    up to summation order), ``torch.int16`` or ``torch.int8`` (faster, within the bound of the
    module docstring).
    Uses ``torch.get_num_threads()`` threads (capped by numba's pool) for layers large enough to
    gain from them.
    """
    return decoder(prepared, scales, offset, group_size, table_dtype)(x, token_set)


def bcq_matmul_lut(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
    table_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """BCQ matmul by table lookup, with the contract of ``bcq_matmul_reference``.

    Prepares the layout on every call; layers keep the prepared form instead (see
    ``alphatune.kernels.bcq_matmul``). CPU tensors only; float32 arithmetic (``table_dtype``:
    see ``lut_matmul``).

    Example::

        >>> import torch
        >>> from alphatune.bcq import fit_greedy
        >>> from alphatune.packing import pack_codes
        >>> fit = fit_greedy(torch.randn(16, 64), bits=3)
        >>> y = bcq_matmul_lut(torch.randn(1, 64), pack_codes(fit.codes), fit.alpha, None, 64, 64)
        >>> y.shape
        torch.Size([1, 16])
    """
    lut_common.check_operands(x, packed, alpha, offset, group_size, in_features)
    lead = x.shape[:-1]
    flat = x.reshape(-1, in_features)
    codes, scales = prepare_codes(packed, in_features), prepare_scales(alpha[:1], alpha[1:])
    y = lut_matmul(flat, codes, scales, offset, None, group_size, table_dtype)
    return y.reshape(*lead, packed.shape[1]).to(x.dtype)
