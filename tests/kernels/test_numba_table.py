"""The byte kernel of uniform 8-bit tables (``kernels.numba_table``) against the torch reference,
and ``BCQTable.linear`` choosing it only where it computes the table's own weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alphatune.embedding import MIN_STEP, BCQTable, fit_table, linear_reference
from alphatune.kernels import numba_table
from alphatune.kernels.numba_threads import numba_threads

pytestmark = pytest.mark.skipif(not numba_table.available(), reason="numba is not installed")


def _weight(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, dim, generator=generator)
    # Rows of every scale (and one constant row: a zero range), as real embeddings have.
    weight *= torch.rand(rows, 1, generator=generator) ** 3 * 5
    weight[0] = 0.25
    return weight


def _levels(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """fit_table's integer levels, computed directly."""
    rows, dim = weight.shape
    part = weight.reshape(rows, dim // group_size, group_size)
    low, high = part.amin(-1, keepdim=True), part.amax(-1, keepdim=True)
    step = ((high - low) / (2**bits - 1)).clamp_min(MIN_STEP)
    return ((part - low) / step).round().clamp(0, 2**bits - 1).to(torch.uint8).reshape(rows, dim)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_levels_from_planes_are_the_fitted_levels(bits: int):
    weight = _weight(300, 96)
    packed, _, _ = fit_table(weight, bits, group_size=32)
    levels = numba_table.levels_from_planes(packed, 96)
    assert levels.dtype == torch.uint8 and levels.shape == (300, 96)
    assert torch.equal(levels, _levels(weight, bits, 32))


def test_uniform_form_gives_the_table_weights():
    table = BCQTable.from_weight(_weight(200, 128))  # fp16 scales, as stored
    step, low = numba_table.uniform_form(table.alpha, table.offset)
    levels = numba_table.levels_from_planes(table.plane_codes(), 128)
    groups = 128 // table.spec.group_size
    dense = (levels.float().reshape(200, groups, -1) * step[..., None] + low[..., None]).reshape(
        200, 128
    )
    assert torch.allclose(dense, table.dequantize(), rtol=0, atol=1e-6 * dense.abs().max())


def test_non_geometric_scales_are_not_uniform():
    table = BCQTable.from_weight(_weight(50, 64))
    alpha = table.alpha.clone()
    alpha[0, 7, 0] *= 1.001  # one plane scale of one group off the geometric series
    assert numba_table.uniform_form(alpha, table.offset) is None
    assert numba_table.uniform_form(table.alpha, table.offset) is not None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("rows,dim", [(1000, 144), (257, 64), (3, 576)])
def test_table_matmul_matches_the_reference(rows: int, dim: int, tokens: int, threads: int):
    table = BCQTable.from_weight(_weight(rows, dim, seed=rows))
    step, low = numba_table.uniform_form(table.alpha, table.offset)
    levels = numba_table.levels_from_planes(table.plane_codes(), dim)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens))
    expected = linear_reference(table, x)
    from numba import config

    threads = min(threads, config.NUMBA_NUM_THREADS)  # 1 where only one CPU is allowed
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with numba_threads(threads):
            y = numba_table.table_matmul(x, levels, step, low, table.spec.group_size)
    finally:
        torch.set_num_threads(previous)
    assert y.shape == (tokens, rows) and y.dtype == torch.float32
    scale = expected.abs().max()
    assert torch.allclose(y, expected, rtol=0, atol=2e-5 * scale)


def test_table_matmul_takes_bytes_in_any_layout():
    """A strided view of the bytes gives the products of its contiguous copy (the kernel reads
    ahead through the bytes' flat view, so it is handed a C-ordered array)."""
    import numpy as np

    from alphatune_runtime import table as runtime_table

    table = BCQTable.from_weight(_weight(300, 128))
    step, low = (t.numpy() for t in numba_table.uniform_form(table.alpha, table.offset))
    levels = numba_table.levels_from_planes(table.plane_codes(), 128).numpy()
    wide = np.zeros((300, 256), np.uint8)
    wide[:, ::2] = levels
    x = np.random.default_rng(0).standard_normal((2, 128)).astype(np.float32)
    group = table.spec.group_size
    np.testing.assert_array_equal(
        runtime_table.table_matmul(x, wide[:, ::2], step, low, group),
        runtime_table.table_matmul(x, levels, step, low, group),
    )


def test_the_product_checks_its_widths():
    import numpy as np

    from alphatune_runtime import table as runtime_table
    from alphatune_runtime.errors import ConfigError

    levels = np.zeros((4, 64), np.uint8)
    scales = np.ones((4, 1), np.float32)
    with pytest.raises(ConfigError, match="do not fit"):
        runtime_table.table_matmul(np.ones((1, 32), np.float32), levels, scales, scales, 64)


def test_the_prefetch_is_emitted_and_refuses_what_it_cannot_address():
    """The read-ahead must reach the machine code (a dropped hint would pass every product
    test); a strided array has no address per index, so it is a typing error."""
    import platform

    import numpy as np
    from numba import njit
    from numba.core.errors import TypingError

    from alphatune_runtime.prefetch import prefetch

    @njit
    def ahead(data):
        for at in range(0, data.shape[0], 64):
            prefetch(data, at)

    data = np.zeros(4096, np.uint8)
    ahead(data)
    if platform.machine() in ("x86_64", "AMD64"):
        assembly = "\n".join(ahead.inspect_asm().values())
        assert "prefetcht0" in assembly

    @njit
    def strided(data):
        prefetch(data[::2], 0)

    with pytest.raises(TypingError):
        strided(data)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_planes_and_levels_convert_both_ways(bits: int):
    packed, _, _ = fit_table(_weight(300, 96), bits, group_size=32)
    levels = numba_table.levels_from_planes(packed, 96)
    assert torch.equal(numba_table.planes_from_levels(levels, bits), packed)


def _planes_table(weight: torch.Tensor, perturb: bool) -> BCQTable:
    """A table loaded from a fit's state dict, its scales made non-geometric if ``perturb``."""
    fitted = BCQTable.from_weight(weight)
    state = fitted.state_dict()
    if perturb:
        state["alpha"] = state["alpha"].clone()
        state["alpha"][3, 5, 0] *= 1.01  # one plane scale of one group off the series
    table = BCQTable(fitted.spec)
    table.load_state_dict(state)
    return table


def test_a_fitted_table_holds_bytes_and_multiplies_with_the_byte_kernel(monkeypatch):
    monkeypatch.delenv("ALPHATUNE_KERNEL", raising=False)
    table = BCQTable.from_weight(_weight(700, 144))
    assert table.byte_form
    calls = []
    real = numba_table.table_matmul
    monkeypatch.setattr(numba_table, "table_matmul", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 144)
    with torch.inference_mode():
        y = table.linear(x)
    assert calls == [1]
    assert torch.allclose(y, linear_reference(table, x), atol=2e-5 * y.abs().max())


def test_a_table_with_other_scales_keeps_the_planes_and_the_general_path(exact_tables):
    weight = _weight(300, 144)
    table = _planes_table(weight, perturb=True)
    assert not table.byte_form and "packed_codes" in dict(table.named_buffers())
    x = torch.randn(1, 144)
    with torch.inference_mode():
        y = table.linear(x)
    assert torch.allclose(y, linear_reference(table, x), atol=2e-5 * y.abs().max())
    # The same planes with geometric scales settle into bytes: same weights, same state dict.
    settled = _planes_table(weight, perturb=False)
    fitted = BCQTable.from_weight(weight)
    assert settled.byte_form and torch.equal(settled.dequantize(), fitted.dequantize())
    for name, tensor in fitted.state_dict().items():
        assert torch.equal(settled.state_dict()[name], tensor), name


def test_reference_setting_skips_the_byte_kernel(monkeypatch):
    monkeypatch.setenv("ALPHATUNE_KERNEL", "reference")
    table = BCQTable.from_weight(_weight(300, 144))
    monkeypatch.setattr(numba_table, "table_matmul", lambda *a: pytest.fail("byte kernel ran"))
    x = torch.randn(1, 144)
    with torch.inference_mode():
        y = table.linear(x)
    assert torch.allclose(y, linear_reference(table, x), atol=2e-5 * y.abs().max())


@pytest.mark.parametrize("dim", [96, 100, 3])
def test_numba_conversions_match_the_torch_bit_ops(dim: int):
    """The numba planes <-> bytes conversions against ``packing``'s torch bit operations (odd
    widths: the last byte of a row is partly padding)."""
    from alphatune.packing import pack_bits, unpack_bits

    generator = torch.Generator().manual_seed(dim)
    levels = torch.randint(0, 256, (50, dim), dtype=torch.uint8, generator=generator)
    planes = torch.stack([pack_bits((levels >> (7 - p)) & 1) for p in range(8)])
    assert torch.equal(numba_table.planes_from_levels(levels, 8), planes)
    assert torch.equal(numba_table.plane_bytes(levels, 8, 3), planes[3])
    rebuilt = sum(unpack_bits(planes[p], dim) << (7 - p) for p in range(8)).to(torch.uint8)
    assert torch.equal(numba_table.levels_from_planes(planes, dim), rebuilt)


@pytest.mark.parametrize(("bits", "dim"), [(8, 96), (8, 100), (3, 3), (5, 17)])
def test_levels_from_plane_slices_match_the_whole_array(bits: int, dim: int):
    """The runtime builds a table's bytes plane by plane (one plane in memory at a time)."""
    from alphatune_runtime import table

    generator = torch.Generator().manual_seed(bits * 1000 + dim)
    planes = torch.randint(0, 256, (bits, 40, -(-dim // 8)), dtype=torch.uint8, generator=generator)
    # Independent of the kernel (levels_from_planes now runs it too): numpy's bit unpacking.
    bits_of = np.unpackbits(planes.numpy(), axis=-1, bitorder="little")[..., :dim]
    expected = sum(bits_of[p].astype(np.uint16) << (bits - 1 - p) for p in range(bits))
    sliced = table.levels_from_plane_slices(iter(planes.numpy()), bits, 40, dim)
    assert (sliced == expected).all()
    assert (table.levels_from_planes(planes.numpy(), dim) == expected).all()
    with pytest.raises(ValueError, match="expected 3 planes, got 2"):
        table.levels_from_plane_slices(iter(planes.numpy()[:2]), 3, 40, dim)
