"""What the LUT-GEMV kernels' torch faces share: the layout from tensors, and the checks.

Every ISA kernel (``alphatune_runtime.avx512`` / ``.avx2``, with their torch faces ``avx512_lut`` /
``avx2_lut``) owns its vector loop and its numba drivers, ``alphatune_runtime.lut`` the
activation tables they all build, and ``alphatune_runtime.layout`` the layout they read (codes
in row blocks, the two scale layouts, a layer's operands), from numpy arrays. This module hands
a layer's tensors to that layout as numpy views (``prepare_codes``, ``scales_*``,
``layer_operands``) and makes the checks and conversions every kernel's torch face makes, with
the same errors: a layer's once (``decoder``), a call's tokens at every call
(``token_operands``), a one-shot call's operands (``check_operands``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from alphatune.errors import ConfigError, KernelUnavailableError
from alphatune_runtime import layout
from alphatune_runtime.layout import LayerOperands, PreparedCodes, PreparedScales

ROWS_INNER, LAYER_ORDER = layout.ROWS_INNER, layout.LAYER_ORDER
supports = layout.supports


def prepare_codes(
    packed: Tensor,
    in_features: int,
    rows: int,
    byte_map: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> PreparedCodes:
    """``layout.prepare_codes`` on a layer's packed codes ``(q, out, ceil(in/8))`` uint8 (read in
    place: the numpy view of the tensor, no copy)."""
    if packed.dtype != torch.uint8 or packed.dim() != 3:
        raise ConfigError(
            f"packed codes must be uint8 (q, out, ceil(in/8)), got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    return layout.prepare_codes(packed.detach().cpu().numpy(), in_features, rows, byte_map, out)


def scales_rows_inner(first_sets: Tensor, rest: Tensor, rows: int) -> PreparedScales:
    """α₁ sets ``(S, out, G)`` and the other planes ``(q-1, out, G)``, rows contiguous (a copy)."""
    return layout.scales_rows_inner(_float32_numpy(first_sets), _float32_numpy(rest), rows)


def scales_in_layer_order(first_sets: Tensor, rest: Tensor, rows: int) -> PreparedScales:
    """α₁ sets ``(S, out, G)`` and the other planes ``(q-1, out, G)`` as they are: views of the
    tensors (no copy) when they are float32 CPU tensors, contiguous, and ``out`` is a multiple
    of ``rows``."""
    return layout.scales_in_layer_order(_float32_numpy(first_sets), _float32_numpy(rest), rows)


def layer_operands(
    prepared: PreparedCodes,
    scales: PreparedScales,
    offset: Tensor | None,
    group_size: int,
    rows: int,
    layout_name: str,
) -> LayerOperands:
    """``layout.layer_operands`` with the offset ``(out, G)`` a tensor (read in place)."""
    offset_np = None if offset is None else _float32_numpy(offset)
    return layout.layer_operands(prepared, scales, offset_np, group_size, rows, layout_name)


def token_operands(
    x: Tensor, token_set: Tensor | None, layer: LayerOperands
) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert a call's tokens: ``x (T, in)`` float32, ``token_set (T,)`` int64."""
    if x.dim() != 2 or x.shape[1] != layer.in_features:
        raise ConfigError(f"x must be (tokens, {layer.in_features}), got {tuple(x.shape)}")
    if token_set is None:
        return _float32_numpy(x), np.zeros(x.shape[0], np.int64)
    sets = token_set.detach().cpu().to(torch.int64).numpy()
    if sets.shape != (x.shape[0],) or (
        sets.size and not 0 <= sets.min() <= sets.max() < len(layer.first)
    ):
        raise ConfigError(
            f"token_set must hold one scale set in [0, {len(layer.first)}) per token, "
            f"got shape {tuple(sets.shape)} for {x.shape[0]} tokens"
        )
    return _float32_numpy(x), sets


def _float32_numpy(t: Tensor) -> np.ndarray:
    """A float32 C-contiguous numpy view of ``t`` (a copy only when the device, dtype or strides
    differ: the callers refuse non-CPU tensors first).

    Decode calls this ~400 times per token, so the usual case costs no tensor op but ``numpy()``.
    """
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype != torch.float32 or not t.is_contiguous():
        t = t.to(torch.float32).contiguous()
    return (t.detach() if t.requires_grad else t).numpy()


def check_operands(
    x: Tensor,
    packed: Tensor,
    alpha: Tensor,
    offset: Tensor | None,
    group_size: int,
    in_features: int,
) -> None:
    """``bcq_matmul_lut``'s checks: CPU tensors, shapes of the reference kernel's contract."""
    tensors = [t for t in (x, packed, alpha, offset) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise KernelUnavailableError(
            "the LUT kernel runs on CPU tensors only: use the reference kernel"
        )
    if x.shape[-1] != in_features:
        raise ConfigError(f"x has {x.shape[-1]} input features, the layer expects {in_features}")
    if group_size < 1 or in_features % group_size:
        raise ConfigError(f"group_size {group_size} must divide in_features={in_features}")
    bits, out = packed.shape[0], packed.shape[1]
    n_groups = in_features // group_size
    if tuple(alpha.shape) != (bits, out, n_groups):
        raise ConfigError(
            f"alpha must have shape (q, out, in/group_size) = {(bits, out, n_groups)}, got {tuple(alpha.shape)}"
        )
    if offset is not None and tuple(offset.shape) != (out, n_groups):
        raise ConfigError(
            f"offset must have shape (out, in/group_size) = {(out, n_groups)}, got {tuple(offset.shape)}"
        )
