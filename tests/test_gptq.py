"""Calibrated rounding (``alphatune.gptq``): output error, not weight error, is what it lowers."""

from __future__ import annotations

import itertools

import pytest
import torch

from alphatune import bcq, gptq
from alphatune.kernels import numba_gptq

GROUP_SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """A (64, 128) weight and the Hessian ``XᵀX`` of correlated inputs."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    mixing = torch.randn(128, 128, generator=generator) / 128**0.5
    x = torch.randn(512, 128, generator=generator) @ mixing  # correlated features
    return weight, x.T @ x


def _bits_id(bits: int) -> str:
    return f"bits={bits}"


@pytest.mark.parametrize("bits", [2, 3, 4], ids=_bits_id)
def test_calibrated_beats_data_free_offset(bits: int, problem) -> None:
    weight, hessian = problem
    data_free = bcq.fit_offset(weight, bits, GROUP_SIZE)
    calibrated = gptq.fit_calibrated(weight, hessian, bits, GROUP_SIZE)
    error_free = gptq.output_error(weight, data_free.dequantize(), hessian)
    error_calibrated = gptq.output_error(weight, calibrated.dequantize(), hessian)
    assert error_calibrated <= error_free
    # On correlated inputs error feedback wins clearly (measured: about half the error).
    assert error_calibrated < 0.8 * error_free


@pytest.mark.parametrize("bits", [2, 3], ids=_bits_id)
def test_calibrated_result_is_canonical(bits: int, problem) -> None:
    weight, hessian = problem
    fitted = gptq.fit_calibrated(weight, hessian, bits, GROUP_SIZE)
    assert fitted.group_size == GROUP_SIZE
    assert fitted.codes.shape == (bits, 64, 128) and fitted.codes.dtype == torch.int8
    assert torch.equal(fitted.codes.abs(), torch.ones_like(fitted.codes))
    assert fitted.alpha.shape == (bits, 64, 128 // GROUP_SIZE)
    assert bool((fitted.alpha >= 0).all())
    assert bool((fitted.alpha[:-1] >= fitted.alpha[1:]).all())
    assert fitted.offset is not None and fitted.offset.shape == (64, 128 // GROUP_SIZE)


@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "in_order"])
@pytest.mark.parametrize("bits", [2, 3], ids=_bits_id)
def test_round_with_error_feedback_returns_codes(bits: int, act_order: bool, problem) -> None:
    weight, hessian = problem
    start = bcq.fit_offset(weight, bits, GROUP_SIZE)
    codes = gptq.round_with_error_feedback(
        weight, hessian, start.alpha, start.offset, GROUP_SIZE, act_order=act_order
    )
    assert codes.shape == (bits, 64, 128)
    assert torch.equal(codes.abs(), torch.ones_like(codes))
    rounded = bcq.dequantize(codes, start.alpha, start.offset, GROUP_SIZE)
    assert gptq.output_error(weight, rounded, hessian) < gptq.output_error(
        weight, start.dequantize(), hessian
    )


def _swept(weight, hessian, bits: int):
    """The inputs of a column sweep: weight and factor in act order, groups, grid."""
    start = bcq.fit_offset(weight, bits, GROUP_SIZE)
    values, midpoints, _ = gptq._grid_values(start.alpha, start.offset)
    order = torch.argsort(hessian.diagonal(), descending=True)
    factor = gptq._inverse_hessian_factor(hessian.double()[order][:, order], 0.01).float()
    return weight[:, order], factor, order // GROUP_SIZE, values, midpoints


@pytest.mark.parametrize("block_size", [1, 7, 32, 200], ids=lambda b: f"block={b}")
def test_blocking_does_not_change_the_result(block_size: int, problem) -> None:
    args = _swept(*problem, bits=3)
    reference = gptq._round_columns_reference(*args, block_size=1)
    index = gptq._round_columns_reference(*args, block_size=block_size)
    # The same arithmetic in another float32 order: a near-midpoint value may round the other way.
    assert (index != reference).float().mean().item() <= 0.01


@pytest.mark.skipif(not numba_gptq.available(), reason="numba is not installed")
@pytest.mark.parametrize("bits", [2, 3, 4], ids=_bits_id)
def test_numba_sweep_matches_the_torch_reference(bits: int, problem) -> None:
    args = _swept(*problem, bits=bits)
    reference = gptq._round_columns_reference(*args, block_size=32)
    index = numba_gptq.round_columns(*args)
    assert index.shape == reference.shape and index.dtype == reference.dtype
    # Error feedback in another float32 order: a value at a midpoint may round the other way,
    # and its changed error moves later columns a little (measured: none of 8,192 differ).
    assert (index != reference).float().mean().item() <= 0.01


@pytest.mark.skipif(not numba_gptq.available(), reason="numba is not installed")
@pytest.mark.parametrize("block_size", [7, 32, 128, 200], ids=lambda b: f"block={b}")
def test_numba_sweep_in_blocks_matches_the_torch_reference(block_size: int, problem) -> None:
    """Blocks that split the 128 columns unevenly (7), evenly (32), and one block (128, 200):
    inside a block numba feeds the errors forward, between blocks one GEMM does."""
    args = _swept(*problem, bits=3)
    reference = gptq._round_columns_reference(*args, block_size=1)
    index = numba_gptq.round_columns(*args, block_size=block_size)
    assert (index != reference).float().mean().item() <= 0.01


@pytest.mark.skipif(not numba_gptq.available(), reason="numba is not installed")
def test_numba_sweep_uneven_tiles(problem) -> None:
    """Row counts that do not fill the last tile, and a single row."""
    weight, hessian = problem
    for rows in (1, 13):
        args = _swept(weight[:rows], hessian, bits=3)
        reference = gptq._round_columns_reference(*args, block_size=32)
        assert (numba_gptq.round_columns(*args) != reference).float().mean().item() <= 0.01


def test_diagonal_hessian_rounds_to_nearest(problem) -> None:
    """Independent inputs leave nothing to feed back: every weight takes its nearest grid value."""
    weight, _ = problem
    hessian = torch.diag(torch.linspace(0.5, 2.0, 128))
    start = bcq.fit_offset(weight, 2, GROUP_SIZE)
    codes = gptq.round_with_error_feedback(weight, hessian, start.alpha, start.offset, GROUP_SIZE)
    rounded = bcq.dequantize(codes, start.alpha, start.offset, GROUP_SIZE)

    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)))  # (4, q)
    grid = torch.einsum("mq,qog->ogm", signs, start.alpha) + start.offset[..., None]  # (out, G, 4)
    grid = grid.repeat_interleave(GROUP_SIZE, dim=1)  # (out, in, 4)
    nearest = grid.gather(-1, (grid - weight[..., None]).abs().argmin(-1, keepdim=True))[..., 0]
    torch.testing.assert_close(rounded, nearest, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4], ids=_bits_id)
def test_refit_scales_lowers_output_error(bits: int, problem) -> None:
    weight, hessian = problem
    start = bcq.fit_offset(weight, bits, GROUP_SIZE)
    for codes in (
        start.codes.float(),
        gptq.round_with_error_feedback(weight, hessian, start.alpha, start.offset, GROUP_SIZE),
    ):
        before = gptq.output_error(
            weight, bcq.dequantize(codes, start.alpha, start.offset, GROUP_SIZE), hessian
        )
        alpha, offset = gptq.refit_scales(weight, hessian, codes, GROUP_SIZE)
        assert alpha.shape == (bits, 64, 128 // GROUP_SIZE)
        assert offset.shape == (64, 128 // GROUP_SIZE)
        after = gptq.output_error(weight, bcq.dequantize(codes, alpha, offset, GROUP_SIZE), hessian)
        assert after <= before


def test_refit_scales_recovers_exact_scales() -> None:
    """A weight that is exactly BCQ on the given codes is reproduced (up to the tiny ridge)."""
    generator = torch.Generator().manual_seed(2)
    codes = (torch.randint(0, 2, (2, 5, 16), generator=generator) * 2 - 1).double()
    alpha = torch.rand(2, 5, 2, generator=generator, dtype=torch.float64) + 0.1
    offset = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    weight = bcq.dequantize(codes, alpha, offset, 8)
    x = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    fitted_alpha, fitted_offset = gptq.refit_scales(weight, x.T @ x, codes, 8, ridge=0.0)
    torch.testing.assert_close(fitted_alpha, alpha, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fitted_offset, offset, rtol=1e-5, atol=1e-5)


def test_output_error_is_the_summed_squared_output_difference() -> None:
    generator = torch.Generator().manual_seed(3)
    weight, approx = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    x = torch.randn(10, 8, generator=generator)
    expected = float((x.double() @ (weight - approx).double().T).square().sum())
    assert gptq.output_error(weight, approx, x.T.double() @ x.double()) == pytest.approx(expected)


def test_output_error_in_float32_matches_float64_with_outlier_channels() -> None:
    """``output_error``'s float32 product stays within 1e-4 of the float64 value on a SmolLM2-like
    problem: a few input channels 100x larger than the rest (a Hessian spanning 1e4 in scale),
    a 3-bit fit's error; and it orders two fits as float64 does."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 576, generator=generator) * 0.05
    x = torch.randn(2048, 576, generator=generator)
    x[:, :4] *= 100.0  # outlier channels
    hessian = x.T @ x
    fits = [bcq.fit_offset(weight, bits, GROUP_SIZE).dequantize() for bits in (3, 4)]

    def in_float64(approx: torch.Tensor) -> float:
        error = weight.double() - approx.double()
        return float(((error @ hessian.double()) * error).sum())

    errors = [gptq.output_error(weight, approx, hessian) for approx in fits]
    exact = [in_float64(approx) for approx in fits]
    for got, want in zip(errors, exact, strict=True):
        assert got == pytest.approx(want, rel=1e-4)
    assert (errors[0] < errors[1]) == (exact[0] < exact[1])
