"""The AVX2 LUT-GEMV (float32 and int8 tables) against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from alphatune.bcq import fit_greedy, fit_offset
from alphatune.errors import ConfigError, KernelUnavailableError
from alphatune.kernels import avx2_lut, avx512_lut
from alphatune.kernels.avx2_lut import bcq_matmul_lut
from alphatune.kernels.reference import bcq_matmul_mixed_reference, bcq_matmul_reference
from alphatune.packing import pack_codes, packed_width
from alphatune_runtime import avx2

pytestmark = pytest.mark.numba
needs_avx2 = pytest.mark.skipif(
    not avx2_lut.available(), reason="this CPU has no AVX2 + FMA; the AVX2 LUT kernel cannot run"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


# (out, in_features, group_size or None for one group per row): odd sizes, partial bytes, partial
# 32-row blocks, groups of one byte up to many, SmolLM2's 576 / 144 and 1536 / 128, and rows of
# more than 128 code bytes (several int8 table scales per group, the last one ragged).
LAYOUTS = [
    (1, 13, None),
    (7, 100, None),
    (17, 60, None),
    (64, 576, 144),
    (64, 576, None),
    (33, 512, 128),
    (7, 1024, 512),
    (7, 256, 32),
    (23, 120, 8),
    (300, 128, 64),
    (40, 1536, 128),
    (9, 2200, None),
]


def _layout_id(layout: tuple[int, int, int | None]) -> str:
    out, in_features, group_size = layout
    return f"{out}x{in_features}-g{group_size or 'row'}"


def _quantized(out: int, in_features: int, group_size: int | None, bits: int, with_offset: bool):
    generator = torch.Generator().manual_seed(1000 * out + in_features + bits)
    weight = torch.randn(out, in_features, generator=generator) / in_features**0.5
    if with_offset:
        fit = fit_offset(weight, bits, group_size, iterations=1)  # one refinement: fast enough
    else:
        fit = fit_greedy(weight, bits, group_size)
    return pack_codes(fit.codes), fit.alpha, fit.offset, fit.group_size


# Integer tables: (largest level, code bytes per table scale at most).
INTEGER_TABLES = {
    torch.int8: (127, avx2_lut.CHUNK_BYTES),
    torch.int16: (32767, avx2_lut.CHUNK_BYTES_INT16),
}


def _integer_bound(
    x: torch.Tensor, alpha: torch.Tensor, group_size: int, table_dtype: torch.dtype
) -> torch.Tensor:
    """The integer tables' worst case (``avx2_lut`` docstring): ``Σ_i Σ_chunks |α_i| · s ·
    bytes`` with ``s = max |table| / levels`` per token and chunk; x (T, in), alpha (q, out, G)
    -> (T, out)."""
    levels, chunk_bytes = INTEGER_TABLES[table_dtype]
    tokens, in_features = x.shape
    n_bytes = packed_width(in_features)
    padded = torch.zeros(tokens, 8 * n_bytes, dtype=torch.float64)
    padded[:, :in_features] = x.double().abs()
    largest = padded.view(tokens, n_bytes, 2, 4).sum(-1).amax(-1)  # (T, bytes): max |entry|
    bytes_per_group = n_bytes if group_size == in_features else group_size // 8
    bound = torch.zeros(tokens, alpha.shape[1], dtype=torch.float64)
    for g in range(alpha.shape[2]):
        weight = alpha[:, :, g].double().abs().sum(0)  # (out,): Σ_i |α_i[row, g]|
        for begin in range(0, bytes_per_group, chunk_bytes):
            first = g * bytes_per_group + begin
            last = g * bytes_per_group + min(bytes_per_group, begin + chunk_bytes)
            scale = largest[:, first:last].amax(-1) / levels  # (T,)
            bound += (scale * (last - first))[:, None] * weight[None]
    return bound.float()


@needs_avx2
@pytest.mark.parametrize("with_offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"bits={b}")
def test_float_tables_match_reference(
    bits: int, layout: tuple[int, int, int | None], with_offset: bool
) -> None:
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, bits, with_offset)
    generator = torch.Generator().manual_seed(7)
    for shape in [(1, in_features), (3, in_features), (8, in_features), (1, 1, in_features)]:
        x = torch.randn(*shape, generator=generator)
        ref = bcq_matmul_reference(x, packed, alpha, offset, g, in_features)
        got = bcq_matmul_lut(x, packed, alpha, offset, g, in_features)
        assert got.shape == ref.shape == (*shape[:-1], out)
        assert got.dtype == x.dtype
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # summation order differs


@needs_avx2
@pytest.mark.parametrize("with_offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("bits", [1, 3, 4], ids=lambda b: f"bits={b}")
@pytest.mark.parametrize("table_dtype", [torch.int16, torch.int8], ids=["int16", "int8"])
def test_integer_tables_stay_within_the_bound(
    table_dtype: torch.dtype, bits: int, layout: tuple[int, int, int | None], with_offset: bool
) -> None:
    """Lossy: never past the worst case of the table rounding, typically far inside it."""
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, bits, with_offset)
    x = torch.randn(8, in_features, generator=torch.Generator().manual_seed(8))
    ref = bcq_matmul_reference(x, packed, alpha, offset, g, in_features)
    got = bcq_matmul_lut(x, packed, alpha, offset, g, in_features, table_dtype)
    assert got.shape == ref.shape and got.dtype == torch.float32
    error = (got - ref).abs()
    bound = _integer_bound(x, alpha, g, table_dtype)
    assert bool((error <= bound + 1e-4 * (1 + ref.abs())).all())
    sqnr_db = 10 * torch.log10(ref.square().sum() / (got - ref).square().sum())
    # Measured: int8 ~40 dB (~1% RMS error), int16 ~48 dB more (float32 rounding takes over).
    assert sqnr_db > (30.0 if table_dtype == torch.int8 else 70.0)


@needs_avx2
def test_up_to_64_tokens() -> None:
    packed, alpha, offset, g = _quantized(40, 576, 144, 3, with_offset=True)
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(9))
    ref = bcq_matmul_reference(x, packed, alpha, offset, g, 576)
    torch.testing.assert_close(bcq_matmul_lut(x, packed, alpha, offset, g, 576), ref)
    # Integer tables are built per token: a token gets the same result alone or in a batch.
    for table_dtype in INTEGER_TABLES:
        batch = bcq_matmul_lut(x, packed, alpha, offset, g, 576, table_dtype)
        alone = bcq_matmul_lut(x[5:6], packed, alpha, offset, g, 576, table_dtype)
        assert torch.equal(batch[5:6], alone)


@needs_avx2
@pytest.mark.parametrize("layout", [(7, 100, None), (64, 576, 144)], ids=_layout_id)
def test_bf16_input_returns_bf16(layout: tuple[int, int, int | None]) -> None:
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, 3, with_offset=True)
    x = torch.randn(3, in_features).to(torch.bfloat16)
    ref = bcq_matmul_reference(x, packed, alpha, offset, g, in_features)
    got = bcq_matmul_lut(x, packed, alpha, offset, g, in_features)
    assert got.dtype == torch.bfloat16
    # Both compute in float32 and round once to bf16: at most one bf16 step apart.
    torch.testing.assert_close(got.float(), ref.float(), rtol=1.6e-2, atol=1e-3)


@needs_avx2
@pytest.mark.parametrize(
    "table_dtype", [torch.float32, torch.int16, torch.int8], ids=["float32", "int16", "int8"]
)
@pytest.mark.parametrize("layout", [(300, 576, 64), (300, 100, None)], ids=_layout_id)
def test_threads_agree(
    layout: tuple[int, int, int | None], table_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks split over threads give the one-thread result exactly; torch keeps its threads."""
    monkeypatch.setattr(avx2_lut, "MIN_PARALLEL_WORK", 0)  # small layers run serially otherwise
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, 3, with_offset=True)
    x = torch.randn(3, in_features)
    one = bcq_matmul_lut(x, packed, alpha, offset, g, in_features, table_dtype)
    torch.set_num_threads(2)
    try:
        two = bcq_matmul_lut(x, packed, alpha, offset, g, in_features, table_dtype)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one, two)


@needs_avx2
@pytest.mark.parametrize("layout", [(23, 120, 8), (64, 576, 144), (7, 100, None)], ids=_layout_id)
@pytest.mark.parametrize("bits", [1, 3, 4], ids=lambda b: f"bits={b}")
def test_mixed_task_scales_per_token(bits: int, layout: tuple[int, int, int | None]) -> None:
    """Token t uses scale set token_set[t]: the reference with that adapter's α₁."""
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, bits, with_offset=True)
    generator = torch.Generator().manual_seed(3)
    bank = alpha[0] * (1 + 0.5 * torch.rand(4, *alpha.shape[1:], generator=generator))
    token_adapter = torch.tensor([2, 0, 3, 3, 1])
    x = torch.randn(5, in_features, generator=generator)
    codes = avx2_lut.prepare_codes(packed, in_features)
    scales = avx2_lut.prepare_scales(bank, alpha[1:])
    y = avx2_lut.lut_matmul(x, codes, scales, offset, token_adapter, g)
    ref = bcq_matmul_mixed_reference(
        x, packed, bank, token_adapter, alpha[1:], offset, g, in_features
    )
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    # Integer tables: each token exactly as if alone with its adapter's scales.
    for table_dtype in INTEGER_TABLES:
        mixed = avx2_lut.lut_matmul(x, codes, scales, offset, token_adapter, g, table_dtype)
        for t, adapter in enumerate(token_adapter.tolist()):
            own = avx2_lut.prepare_scales(bank[adapter : adapter + 1], alpha[1:])
            alone = avx2_lut.lut_matmul(x[t : t + 1], codes, own, offset, None, g, table_dtype)
            assert torch.equal(mixed[t : t + 1], alone)


@needs_avx2
def test_no_tokens() -> None:
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    for table_dtype in avx2_lut.TABLE_DTYPES:
        y = bcq_matmul_lut(torch.empty(0, 64), packed, alpha, offset, g, 64, table_dtype)
        assert y.shape == (0, 7)


@needs_avx2
@pytest.mark.parametrize("table_dtype", [torch.int16, torch.int8], ids=["int16", "int8"])
def test_integer_tables_of_zeros_and_of_non_finite_inputs(table_dtype: torch.dtype) -> None:
    """Zero activations are exact (the offset term alone); NaN or inf still give NaN."""
    packed, alpha, offset, g = _quantized(40, 576, 144, 3, with_offset=True)
    zeros = torch.zeros(1, 576)
    got = bcq_matmul_lut(zeros, packed, alpha, offset, g, 576, table_dtype)
    torch.testing.assert_close(got, bcq_matmul_reference(zeros, packed, alpha, offset, g, 576))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(2, 576)
        x[1, 300] = bad
        got = bcq_matmul_lut(x, packed, alpha, offset, g, 576, table_dtype)
        assert bool(got[0].isfinite().all()) and bool(got[1].isnan().all())


@needs_avx2
def test_alpha_requiring_grad_is_read_not_tracked() -> None:
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    alpha = alpha.clone().requires_grad_(True)
    x = torch.randn(1, 64)
    y = bcq_matmul_lut(x, packed, alpha, offset, g, 64)
    assert not y.requires_grad
    ref = bcq_matmul_reference(x, packed, alpha, offset, g, 64).detach()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_mirrored_nibbles_are_their_own_inverse() -> None:
    """Each nibble m >= 8 is stored as m ^ 7; applying the map twice gives the byte back."""
    table = torch.from_numpy(avx2.MIRRORED).long()
    assert torch.equal(table[table], torch.arange(256))
    assert torch.equal(table[:8], torch.arange(8))  # low nibbles < 8, high nibble 0: unchanged
    assert int(table[0x8F]) == 0xF8  # low nibble 15 -> 8, high nibble 8 -> 15


@needs_avx2
@pytest.mark.parametrize("in_features,group_size", [(16, 4), (24, 12)], ids=["g=4", "g=12"])
def test_groups_splitting_a_byte_are_refused(in_features: int, group_size: int) -> None:
    assert not avx2_lut.supports(group_size, in_features)
    packed = pack_codes(torch.ones(2, 3, in_features, dtype=torch.int8))
    alpha = torch.ones(2, 3, in_features // group_size)
    with pytest.raises(KernelUnavailableError, match="multiple of 8"):
        bcq_matmul_lut(torch.randn(1, in_features), packed, alpha, None, group_size, in_features)


@needs_avx2
def test_inconsistent_arguments_are_config_errors() -> None:
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=True)
    x = torch.randn(1, 64)
    with pytest.raises(ConfigError, match="alpha must have shape"):
        bcq_matmul_lut(x, packed, alpha[:1], offset, g, 64)
    with pytest.raises(ConfigError, match="offset must have shape"):
        bcq_matmul_lut(x, packed, alpha, offset[:3], g, 64)
    with pytest.raises(ConfigError, match="input features"):
        bcq_matmul_lut(torch.randn(1, 65), packed, alpha, offset, g, 64)
    with pytest.raises(ConfigError, match="packed width"):
        bcq_matmul_lut(x, packed[..., :-1], alpha, offset, g, 64)
    with pytest.raises(ConfigError, match="table_dtype"):
        bcq_matmul_lut(x, packed, alpha, offset, g, 64, torch.float16)
    # The AVX-512 kernel's layout (16-row blocks) is not this kernel's (32).
    other = avx512_lut.prepare_codes(packed, 64)
    scales = avx2_lut.prepare_scales(alpha[:1], alpha[1:])
    with pytest.raises(ConfigError, match="blocks of 16 rows"):
        avx2_lut.lut_matmul(x, other, scales, offset, None, g)


@needs_avx2
def test_scales_are_read_in_place_unless_rows_need_padding() -> None:
    """The kernel reads the layer's own α (no copy) when ``out`` fills whole 32-row blocks; else
    a copy padded with zero rows. Scales in the AVX-512 layout are refused."""
    alpha = torch.rand(3, 64, 4)
    scales = avx2_lut.prepare_scales(alpha[:1], alpha[1:])
    assert scales.first.ctypes.data == alpha.data_ptr()
    assert scales.rest.ctypes.data == alpha[1:].data_ptr()
    odd = torch.rand(3, 40, 4)
    padded = avx2_lut.prepare_scales(odd[:1], odd[1:])
    assert padded.rest.shape == (2, 64, 4) and not np.shares_memory(padded.rest, odd.numpy())
    assert np.array_equal(padded.rest[:, :40], odd[1:].numpy()) and not padded.rest[:, 40:].any()
    packed, alpha, offset, g = _quantized(64, 256, 32, 3, with_offset=True)
    codes = avx2_lut.prepare_codes(packed, 256)
    rows_inner = avx512_lut.prepare_scales(alpha[:1], alpha[1:])
    with pytest.raises(ConfigError, match="layer-order"):
        avx2_lut.lut_matmul(torch.randn(1, 256), codes, rows_inner, offset, None, g)


@pytest.mark.parametrize("out_features", [64, 40, 7])
def test_codes_prepared_into_a_buffer_are_the_same(out_features: int) -> None:
    """``prepare_codes(out=...)`` (the engine's flat buffer) writes what a fresh array holds,
    padding rows included; a buffer of the wrong shape is a ConfigError."""
    packed, _, _, _ = _quantized(out_features, 100, None, 3, with_offset=False)
    fresh = avx2_lut.prepare_codes(packed, 100).codes
    buffer = np.full(fresh.shape, 0xAB, np.uint8)  # garbage that must all be overwritten
    assert avx2_lut.prepare_codes(packed, 100, buffer).codes is buffer
    assert np.array_equal(buffer, fresh)
    with pytest.raises(ConfigError, match="out must be C-contiguous uint8"):
        avx2_lut.prepare_codes(packed, 100, np.empty((1, *fresh.shape[1:]), np.uint8))


def test_missing_numba_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    cause = ImportError("No module named 'numba'")
    monkeypatch.setattr(avx2, "IMPORT_ERROR", cause)
    assert not avx2_lut.available()
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    with pytest.raises(KernelUnavailableError, match="pip install numba") as info:
        bcq_matmul_lut(torch.randn(1, 64), packed, alpha, offset, g, 64)
    assert info.value.__cause__ is cause


def _levels_reference(x: np.ndarray, bytes_per_group: int, split: bool) -> tuple[np.ndarray, ...]:
    """Integer table levels by their definition (``avx2_lut`` docstring), in float64: for each
    quad of inputs the 16 signed sums, a scale per chunk of a group's bytes, levels in the
    kernel's mirrored nibble order. Returns (levels (T, bytes, 2, 16) int, scales (T, chunks))."""
    top, chunk_bytes = (32767, 64) if split else (127, 128)
    tokens, in_features = x.shape
    n_bytes = packed_width(in_features)
    padded = np.zeros((tokens, 8 * n_bytes))
    padded[:, :in_features] = x
    quads = padded.reshape(tokens, n_bytes, 2, 4)
    signs = np.array([[1 if m >> b & 1 else -1 for b in range(4)] for m in range(16)])
    tables = quads @ signs.T  # (T, bytes, 2, 16): entry m = Σ_b ±x_b
    mirrored = tables[..., [m if m < 8 else m ^ 7 for m in range(16)]]
    levels, scales = np.zeros_like(mirrored), []
    for first in range(0, n_bytes, bytes_per_group):
        for begin in range(first, first + bytes_per_group, chunk_bytes):
            end = min(first + bytes_per_group, begin + chunk_bytes)
            scale = np.abs(tables[:, begin:end]).max(axis=(1, 2, 3)) / top  # (T,)
            scales.append(scale)
            levels[:, begin:end] = np.rint(mirrored[:, begin:end] / scale[:, None, None, None])
    return levels.astype(np.int64), np.stack(scales, axis=1)


@needs_avx2
@pytest.mark.parametrize("split", [True, False], ids=["int16", "int8"])
@pytest.mark.parametrize(
    "in_features,group_size", [(576, 64), (100, 100), (13, 13), (2200, 2200)], ids=str
)
def test_integer_tables_match_their_definition(
    in_features: int, group_size: int, split: bool
) -> None:
    """The vector code that builds integer tables straight from x (``_quad_levels``): every level
    within one of its definition (float32 sums round differently), the chunk scales to float32
    precision, a partial last quad zero-padded, and the group sums (float32 sums)."""
    x = np.random.default_rng(in_features).standard_normal((3, in_features)).astype(np.float32)
    n_bytes = packed_width(in_features)
    bytes_per_group = n_bytes if group_size == in_features else group_size // 8
    n_groups = n_bytes // bytes_per_group
    levels = np.empty((3, (64 if split else 32) * n_bytes), np.uint8 if split else np.int8)
    chunk_scales, group_sums = avx2.fill_tables_native(
        x, group_size, n_groups, bytes_per_group, split, levels, True, 1
    )
    if split:  # low bytes (unsigned) then high bytes (signed) of each code byte's two tables
        pairs = levels.reshape(3, n_bytes, 2, 32)
        got = pairs[:, :, 1].view(np.int8).astype(np.int64) * 256 + pairs[:, :, 0]
    else:
        got = levels.view(np.int8).astype(np.int64)
    expected, scales = _levels_reference(x.astype(np.float64), bytes_per_group, split)
    assert np.abs(got.reshape(expected.shape) - expected).max() <= 1
    np.testing.assert_allclose(chunk_scales, scales, rtol=1e-6)
    sums = x.astype(np.float64).reshape(3, n_groups, -1).sum(-1)
    np.testing.assert_allclose(group_sums, sums, rtol=1e-5, atol=1e-5)
