"""Bit packing (``alphatune.packing``): exact round trips and the documented byte layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alphatune.errors import ConfigError
from alphatune.packing import pack_codes, packed_width, unpack_bits, unpack_codes


def _random_codes(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 4),
    out=st.integers(1, 5),
    in_features=st.integers(1, 100),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.int8, torch.float32]),
)
def test_round_trip(bits: int, out: int, in_features: int, seed: int, dtype: torch.dtype) -> None:
    codes = _random_codes((bits, out, in_features), seed, dtype)
    packed = pack_codes(codes)

    width = (in_features + 7) // 8
    assert packed_width(in_features) == width
    assert packed.shape == (bits, out, width)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, in_features, dtype=dtype), codes)
    assert torch.equal(unpack_codes(packed, in_features), codes.to(torch.int8))  # default int8
    # Padding bits past in_features are zero: unpack the full bytes and look past the end.
    all_bits = unpack_bits(packed, 8 * width)
    assert not bool(all_bits[..., in_features:].any())
    assert torch.equal(all_bits[..., :in_features], (codes > 0).to(torch.uint8))


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([+1, -1, -1, -1, -1, -1, -1, -1, +1], [1, 1]),  # bit 0 of byte 0, bit 0 of byte 1
        ([-1, +1], [2]),  # least significant bit first
        ([-1] * 7 + [+1], [128]),
        ([+1] * 8, [255]),
        ([-1] * 8, [0]),
        ([+1, +1, -1, +1, -1, -1, -1, -1, -1, -1, +1], [11, 4]),
    ],
    ids=["9-inputs", "lsb-first", "msb", "all-plus", "all-minus", "11-inputs"],
)
def test_bit_layout(codes: list[int], expected: list[int]) -> None:
    packed = pack_codes(torch.tensor(codes, dtype=torch.int8))
    assert torch.equal(packed, torch.tensor(expected, dtype=torch.uint8))
    assert torch.equal(unpack_codes(packed, len(codes)), torch.tensor(codes, dtype=torch.int8))


def test_leading_dimensions_pack_independently() -> None:
    codes = _random_codes((3, 4, 21), seed=5, dtype=torch.int8)
    packed = pack_codes(codes)
    for i in range(3):
        for r in range(4):
            assert torch.equal(packed[i, r], pack_codes(codes[i, r]))


@pytest.mark.parametrize("bad", [0, 2], ids=["zero", "two"])
def test_codes_outside_plus_minus_one(bad: int) -> None:
    codes = torch.ones(2, 3, 10, dtype=torch.int8)
    codes[1, 2, 7] = bad
    with pytest.raises(ConfigError, match="-1 and \\+1"):
        pack_codes(codes)


@pytest.mark.parametrize("in_features", [8, 25], ids=lambda n: f"in={n}")
def test_unpack_with_wrong_in_features(in_features: int) -> None:
    packed = pack_codes(torch.ones(2, 3, 17))  # 3 bytes per row
    with pytest.raises(ConfigError, match="in_features"):
        unpack_codes(packed, in_features)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32], ids=str)
def test_unpack_needs_uint8(dtype: torch.dtype) -> None:
    packed = pack_codes(torch.ones(2, 16)).to(dtype)
    with pytest.raises(ConfigError, match="uint8"):
        unpack_codes(packed, 16)
