"""The AVX-512 LUT-GEMV and the numba dequantization against the torch reference."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("numba")

from alphatune.bcq import fit_greedy, fit_offset
from alphatune.errors import ConfigError, KernelUnavailableError
from alphatune.kernels import avx512_lut, numba_dequant
from alphatune.kernels.avx512_lut import bcq_matmul_lut
from alphatune.kernels.reference import (
    bcq_matmul_mixed_reference,
    bcq_matmul_reference,
    dequantize_packed,
)
from alphatune.packing import pack_codes
from alphatune_runtime import avx512

pytestmark = pytest.mark.numba
needs_avx512 = pytest.mark.skipif(
    not avx512_lut.available(), reason="this CPU has no AVX-512F; the LUT kernel is not used here"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


# (out, in_features, group_size or None for one group per row): odd sizes, partial bytes and
# row blocks, groups of one byte up to many, SmolLM2's 576 / 144.
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


@needs_avx512
@pytest.mark.parametrize("with_offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"bits={b}")
def test_lut_matches_reference(
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


@needs_avx512
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


@needs_avx512
@pytest.mark.parametrize("layout", [(300, 576, 64), (300, 100, None)], ids=_layout_id)
def test_threads_agree(
    layout: tuple[int, int, int | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks split over threads give the one-thread result exactly; torch keeps its threads."""
    monkeypatch.setattr(avx512_lut, "MIN_PARALLEL_WORK", 0)  # small layers run serially otherwise
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, 3, with_offset=True)
    x = torch.randn(3, in_features)
    one = bcq_matmul_lut(x, packed, alpha, offset, g, in_features)
    torch.set_num_threads(2)
    try:
        two = bcq_matmul_lut(x, packed, alpha, offset, g, in_features)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one, two)


@needs_avx512
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
    codes = avx512_lut.prepare_codes(packed, in_features)
    y = avx512_lut.lut_matmul(
        x, codes, avx512_lut.prepare_scales(bank, alpha[1:]), offset, token_adapter, g
    )
    ref = bcq_matmul_mixed_reference(
        x, packed, bank, token_adapter, alpha[1:], offset, g, in_features
    )
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@needs_avx512
def test_no_tokens() -> None:
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    assert bcq_matmul_lut(torch.empty(0, 64), packed, alpha, offset, g, 64).shape == (0, 7)


@needs_avx512
def test_alpha_requiring_grad_is_read_not_tracked() -> None:
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    alpha = alpha.clone().requires_grad_(True)
    x = torch.randn(1, 64)
    y = bcq_matmul_lut(x, packed, alpha, offset, g, 64)
    assert not y.requires_grad
    ref = bcq_matmul_reference(x, packed, alpha, offset, g, 64).detach()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@needs_avx512
@pytest.mark.parametrize("in_features,group_size", [(16, 4), (24, 12)], ids=["g=4", "g=12"])
def test_groups_splitting_a_byte_are_refused(in_features: int, group_size: int) -> None:
    assert not avx512_lut.supports(group_size, in_features)
    packed = pack_codes(torch.ones(2, 3, in_features, dtype=torch.int8))
    alpha = torch.ones(2, 3, in_features // group_size)
    with pytest.raises(KernelUnavailableError, match="multiple of 8"):
        bcq_matmul_lut(torch.randn(1, in_features), packed, alpha, None, group_size, in_features)


@needs_avx512
def test_inconsistent_shapes_are_config_errors() -> None:
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


@pytest.mark.parametrize("with_offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("layout", [*LAYOUTS, (9, 36, 12), (5, 20, 4)], ids=_layout_id)
@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"bits={b}")
def test_fast_dequantize_matches_reference(
    bits: int, layout: tuple[int, int, int | None], with_offset: bool
) -> None:
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, bits, with_offset)
    ref = dequantize_packed(packed, alpha, offset, g, in_features)
    got = numba_dequant.dequantize_fast(packed, alpha, offset, g, in_features)
    assert got.shape == (out, in_features) and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_fast_dequantize_threads_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numba_dequant, "_MIN_PARALLEL_BYTES", 0)
    packed, alpha, offset, g = _quantized(300, 576, 144, 3, with_offset=True)
    one = numba_dequant.dequantize_fast(packed, alpha, offset, g, 576)
    torch.set_num_threads(2)
    try:
        two = numba_dequant.dequantize_fast(packed, alpha, offset, g, 576)
    finally:
        torch.set_num_threads(1)
    assert torch.equal(one, two)


def test_missing_numba_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    cause = ImportError("No module named 'numba'")
    monkeypatch.setattr(avx512, "IMPORT_ERROR", cause)
    assert not avx512_lut.available()
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    with pytest.raises(KernelUnavailableError, match="pip install numba") as info:
        bcq_matmul_lut(torch.randn(1, 64), packed, alpha, offset, g, 64)
    assert info.value.__cause__ is cause


def test_modules_import_and_fall_back_without_numba() -> None:
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch\n"
        "from alphatune.kernels import avx512_lut, numba_dequant, bcq_matmul, dequantize_packed\n"
        "assert not avx512_lut.available() and not numba_dequant.available()\n"
        "from alphatune.bcq import fit_greedy\n"
        "from alphatune.packing import pack_codes\n"
        "fit = fit_greedy(torch.randn(8, 64), 2, 32)\n"
        "x = torch.randn(1, 64)\n"
        "y = bcq_matmul(x, pack_codes(fit.codes), fit.alpha, None, 32, 64)\n"
        "w = dequantize_packed(pack_codes(fit.codes), fit.alpha, None, 32, 64)\n"
        "torch.testing.assert_close(y, x @ w.T)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fast_dequantize_into_the_workspace() -> None:
    """``reuse=True`` gives the same weight, in one buffer per shape that the next call overwrites."""
    packed, alpha, offset, g = _quantized(33, 512, 128, 3, with_offset=True)
    fresh = numba_dequant.dequantize_fast(packed, alpha, offset, g, 512)
    first = numba_dequant.dequantize_fast(packed, alpha, offset, g, 512, reuse=True)
    torch.testing.assert_close(first, fresh, rtol=0, atol=0)
    second = numba_dequant.dequantize_fast(packed, alpha * 2, offset, g, 512, reuse=True)
    assert second.data_ptr() == first.data_ptr()
    assert not torch.equal(second, fresh)


@pytest.mark.parametrize("layout", [(7, 100, None), (33, 512, 128), (9, 36, 12)], ids=_layout_id)
def test_unpack_signs_matches_packing(layout: tuple[int, int, int | None]) -> None:
    from alphatune.kernels import unpack_signs
    from alphatune.packing import unpack_codes

    out, in_features, group_size = layout
    packed, *_ = _quantized(out, in_features, group_size, 3, with_offset=False)
    for dtype in (torch.float32, torch.float64):
        expected = unpack_codes(packed, in_features, dtype=dtype)
        assert torch.equal(unpack_signs(packed, in_features, dtype), expected)
