"""Bit-packing of binary codes: the one place the packed layout is defined.

Layout ``bitplane_u8``: codes of shape ``(q, out, in)`` in {-1, +1} become ``(q, out, ceil(in / 8))``
uint8. Byte ``k`` of a row holds inputs ``8k .. 8k+7``; bit ``j`` (least significant first) is 1 for
a +1 code and 0 for -1. Padding bits past ``in`` are 0 and ignored when unpacking.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alphatune.errors import ConfigError

_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.uint8)


def packed_width(in_features: int) -> int:
    """Bytes per packed row."""
    return (in_features + 7) // 8


def pack_codes(codes: Tensor) -> Tensor:
    """Pack ±1 codes ``(..., in)`` into uint8 ``(..., ceil(in/8))``."""
    if codes.numel() and not bool(((codes == 1) | (codes == -1)).all()):
        raise ConfigError("codes must contain only -1 and +1")
    return pack_bits((codes > 0).to(torch.uint8))


def pack_bits(bits: Tensor) -> Tensor:
    """Pack {0, 1} uint8 ``(..., in)`` into uint8 ``(..., ceil(in/8))`` (``unpack_bits``'s inverse)."""
    in_features = bits.shape[-1]
    pad = packed_width(in_features) * 8 - in_features
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*bits.shape[:-1], -1, 8)
    return (bits * _BIT_WEIGHTS.to(bits.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, in_features: int) -> Tensor:
    """Unpack to {0, 1} uint8 ``(..., in_features)``."""
    if packed.dtype != torch.uint8:
        raise ConfigError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_width(in_features):
        raise ConfigError(
            f"packed width {packed.shape[-1]} does not match in_features={in_features} "
            f"(expected {packed_width(in_features)} bytes per row)"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1  # (..., bytes, 8)
    return bits.reshape(*packed.shape[:-1], -1)[..., :in_features]


def unpack_codes(packed: Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> Tensor:
    """Unpack uint8 ``(..., ceil(in/8))`` to ±1 codes ``(..., in_features)`` of ``dtype``."""
    bits = unpack_bits(packed, in_features)
    return (bits.to(dtype) * 2 - 1).to(dtype)
