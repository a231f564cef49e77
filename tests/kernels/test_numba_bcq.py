"""The numba alternating BCQ fit (``kernels.numba_bcq``) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from alphatune import bcq
from alphatune.kernels import numba_bcq

pytestmark = pytest.mark.skipif(not numba_bcq.available(), reason="numba is not installed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Small tensors: one thread avoids thread start-up on a busy machine."""


def _start(bits: int, with_offset: bool, heavy_tails: bool):
    generator = torch.Generator().manual_seed(bits)
    rows = torch.randn(300, 48, generator=generator)
    if heavy_tails:
        rows = rows * torch.rand(300, 1, generator=generator) ** 3 * 10  # groups of all scales
    if with_offset:
        rows = rows + 0.3
        codes, alpha, offset = bcq.uniform_init(rows, bits)
        return rows, codes, alpha, offset
    codes, alpha = bcq._rows_greedy(rows, bits)
    return rows, codes, alpha, None


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("with_offset", [True, False], ids=["offset", "no-offset"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_numba_fit_matches_the_torch_reference(bits: int, with_offset: bool, weighted: bool):
    rows, codes, alpha, offset = _start(bits, with_offset, heavy_tails=True)
    weights = (
        torch.rand(rows.shape, generator=torch.Generator().manual_seed(1)) if weighted else None
    )
    table = bcq._combination_signs(bits, torch.float64, rows.device)
    fast = numba_bcq.alternate(rows, codes, alpha, offset, 10, weights, table)
    slow = bcq._alternate_reference(rows, codes, alpha, offset, 10, weights)
    fast_error = bcq._row_errors(rows, *fast, weights)
    slow_error = bcq._row_errors(rows, *slow, weights)
    # Same algorithm, float64 sums against float32: per group the errors agree to rounding, and
    # where a near-tie went the other way the two iterates still fit equally well.
    torch.testing.assert_close(fast_error, slow_error, rtol=1e-3, atol=1e-5)
    same_codes = (fast[0] == slow[0]).all(dim=0).all(dim=1).float().mean().item()
    assert same_codes >= 0.95, same_codes
    assert fast[0].dtype == codes.dtype and fast[1].shape == alpha.shape
    assert (fast[2] is None) == (offset is None)


def test_numba_fit_never_raises_the_error():
    """The best iterate is kept: no group ends worse than its start, as in the reference."""
    rows, codes, alpha, offset = _start(3, True, heavy_tails=False)
    table = bcq._combination_signs(3, torch.float64, rows.device)
    before = bcq._row_errors(rows, codes, alpha, offset)
    after = bcq._row_errors(rows, *numba_bcq.alternate(rows, codes, alpha, offset, 5, None, table))
    assert bool((after <= before * (1 + 1e-6)).all())


def test_zero_iterations_keep_the_start():
    rows, codes, alpha, offset = _start(2, True, heavy_tails=False)
    table = bcq._combination_signs(2, torch.float64, rows.device)
    out = numba_bcq.alternate(rows, codes, alpha, offset, 0, None, table)
    assert torch.equal(out[0], codes) and torch.equal(out[1], alpha) and torch.equal(out[2], offset)
