"""Dequantization from a kernel's code layout against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alphatune.kernels.reference import dequantize_packed
from alphatune_runtime import avx2, dequant, dequant_avx512, layout
from alphatune_runtime.errors import ConfigError

pytestmark = pytest.mark.numba

LAYOUTS = {"avx2 (32 rows, mirrored nibbles)": (32, avx2.MIRRORED), "avx512 (16 rows)": (16, None)}


def random_layer(bits: int, out: int, inputs: int, group_size: int, offset: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (bits, out, (inputs + 7) // 8), generator=generator)
    packed = packed.to(torch.uint8)
    alpha = torch.rand(bits, out, inputs // group_size, generator=generator) + 0.1
    shift = torch.randn(out, inputs // group_size, generator=generator) if offset else None
    return packed, alpha, shift


@pytest.mark.parametrize("kernel_layout", LAYOUTS.values(), ids=list(LAYOUTS))
@pytest.mark.parametrize(
    "bits, out, inputs, group_size, offset",
    [(3, 64, 96, 32, True), (2, 40, 64, 64, False), (4, 33, 20, 20, False), (1, 16, 128, 8, True)],
    ids=["q3-g32-offset", "q2-row", "q4-rows-and-bytes-padded", "q1-g8-offset"],
)
def test_dequantize_from_a_kernel_layout_equals_the_reference(
    kernel_layout, bits, out, inputs, group_size, offset
):
    rows, byte_map = kernel_layout
    packed, alpha, shift = random_layer(bits, out, inputs, group_size, offset)
    expected = dequantize_packed(packed, alpha, shift, group_size, inputs)
    codes = layout.prepare_codes(packed.numpy(), inputs, rows, byte_map).codes
    args = (
        codes,
        dequant.inverse_byte_map(byte_map),
        alpha[0].numpy(),
        alpha[1:].numpy(),
        None if shift is None else shift.numpy(),
        group_size,
    )
    dense = dequant.dequantize(*args, np.full((out, inputs), np.nan, np.float32))
    torch.testing.assert_close(torch.from_numpy(dense), expected, rtol=1e-6, atol=1e-6)
    # bfloat16: the same float32 sums, rounded to nearest (ties to even) as torch rounds them.
    bits16 = dequant.dequantize(*args, np.zeros((out, inputs), np.uint16))
    as_bf16 = torch.from_numpy(bits16.view(np.int16)).view(torch.bfloat16)
    assert torch.equal(as_bf16, torch.from_numpy(dense).to(torch.bfloat16))


@pytest.mark.skipif(not dequant_avx512.available(), reason="no AVX-512BW on this CPU")
@pytest.mark.parametrize("kernel_layout", LAYOUTS.values(), ids=list(LAYOUTS))
@pytest.mark.parametrize(
    "bits, out, inputs, group_size, offset",
    [
        (3, 70, 576, 144, True),
        (3, 24, 80, 40, False),
        (5, 32, 256, 128, False),
        (2, 40, 68, 68, True),
        (6, 16, 64, 32, True),
    ],
    ids=[
        "q3-g144-tails",
        "q3-g40-overlapping-tail",
        "q5-g128",
        "q2-row-partial-byte",
        "q6-generic-loop",
    ],
)
@pytest.mark.parametrize("dtype", [np.uint16, np.float32], ids=["bfloat16", "float32"])
def test_lookup_path_gives_the_generic_loops_bits(
    kernel_layout, bits, out, inputs, group_size, offset, dtype
):
    """The same float32 sums in the same order: bit-identical bfloat16 (``vpermw``) and
    float32 (``vpermps``, up to 4 bits), tails (groups of 18 and 5 bytes: one more lookup
    overlapping the group's last ones; a partial last byte) included; 6 bits (64 values), and 5
    bits in float32, go through the generic loop."""
    rows, byte_map = kernel_layout
    packed, alpha, shift = random_layer(bits, out, inputs, group_size, offset, seed=3)
    codes = layout.prepare_codes(packed.numpy(), inputs, rows, byte_map).codes
    args = (
        codes, dequant.inverse_byte_map(byte_map), alpha[0].numpy(), alpha[1:].numpy(),
        None if shift is None else shift.numpy(), group_size,
    )  # fmt: skip
    generic = dequant.dequantize(*args, np.zeros((out, inputs), dtype), vector_path=False)
    vector = dequant.dequantize(*args, np.full((out, inputs), 7, dtype))
    np.testing.assert_array_equal(vector, generic)


def test_bfloat16_rounding_is_to_nearest_even():
    """Values exactly between two bfloat16 numbers go to the one with an even last bit."""
    codes = np.zeros((1, 1, 1, 16), np.uint8)  # every code -1: the weight is offset - α
    values = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, -(1 + 2**-8)], np.float32)
    out = np.zeros((4, 8), np.uint16)
    for row, value in enumerate(values):  # α = 0: the weight is the offset
        first, rest = np.zeros((4, 1), np.float32), np.zeros((0, 4, 1), np.float32)
        shift = np.zeros((4, 1), np.float32)
        shift[row] = value
        dequant.dequantize(codes, dequant.inverse_byte_map(None), first, rest, shift, 8, out)
        rounded = torch.from_numpy(out[row].view(np.int16)).view(torch.bfloat16)
        assert torch.equal(rounded, torch.full((8,), float(value)).to(torch.bfloat16))


def test_nan_stays_nan_in_bfloat16():
    """A NaN scale (a broken adapter) must not round into an infinity or a zero weight."""
    codes = np.zeros((1, 1, 1, 16), np.uint8)
    for bits in (0x7F800001, 0xFFFF8000, 0x7FC00000):
        shift = np.zeros((2, 1), np.float32)
        shift[0] = np.array([bits], np.uint32).view(np.float32)[0]
        out = np.zeros((2, 8), np.uint16)
        first, rest = np.zeros((2, 1), np.float32), np.zeros((0, 2, 1), np.float32)
        inverse = dequant.inverse_byte_map(None)
        dequant.dequantize(codes, inverse, first, rest, shift, 8, out, vector_path=False)
        assert torch.from_numpy(out[0].view(np.int16)).view(torch.bfloat16).isnan().all()


def test_bad_operands_are_clear_errors():
    codes = np.zeros((2, 1, 2, 16), np.uint8)
    first, rest = np.ones((16, 2), np.float32), np.ones((1, 16, 2), np.float32)
    inverse = dequant.inverse_byte_map(None)
    with pytest.raises(ConfigError, match="float32 or uint16"):
        dequant.dequantize(codes, inverse, first, rest, None, 8, np.zeros((16, 16), np.float64))
    with pytest.raises(ConfigError, match="do not fit"):
        dequant.dequantize(codes, inverse, first, rest, None, 4, np.zeros((16, 16), np.float32))
    with pytest.raises(ConfigError, match="do not hold a"):
        tall = np.ones((32, 2), np.float32)  # 32 rows: more than the codes' one block of 16
        dequant.dequantize(
            codes, inverse, tall, tall[None], None, 8, np.zeros((32, 16), np.float32)
        )
    with pytest.raises(ConfigError, match="offset"):
        dequant.dequantize(codes, inverse, first, rest, np.ones((16, 1), np.float32), 8,
                           np.zeros((16, 16), np.float32))  # fmt: skip
    with pytest.raises(ConfigError, match="C-contiguous"):
        dequant.dequantize(
            codes, inverse, first, rest, None, 8, np.zeros((16, 32), np.float32)[:, ::2]
        )
    with pytest.raises(ConfigError, match="permutation"):
        dequant.inverse_byte_map(np.zeros(256, np.uint8))
