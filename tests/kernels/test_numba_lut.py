"""The numba LUT-GEMV against the torch reference (the definition of correct)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("numba")

from alphatune.bcq import fit_greedy, fit_offset
from alphatune.errors import ConfigError, KernelUnavailableError
from alphatune.kernels import numba_lut
from alphatune.kernels.numba_lut import bcq_matmul_lut, numba_available
from alphatune.kernels.reference import bcq_matmul_reference
from alphatune.packing import pack_codes

pytestmark = pytest.mark.numba


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up and spinning on a busy machine."""


# (out, in_features, group_size or None for one group per row). Which path each one takes:
# words: ceil(in/8) % 8 == 0 and (one group or group_size % 64 == 0); bytes: the rest.
LAYOUTS = [
    (1, 13, None),  # bytes, partial last byte
    (7, 100, None),  # bytes, partial last byte
    (7, 60, None),  # words, partial last byte inside the last word
    (64, 576, None),  # words, one group (SmolLM2 hidden size)
    (64, 576, 64),  # words, one word per group
    (7, 512, 128),  # words, two words per group
    (7, 1024, 512),  # words, a group spans several tiles
    (7, 256, 32),  # bytes, groups of 4 bytes
    (7, 120, 8),  # bytes, one byte per group
    (300, 128, None),  # words, several row blocks, the last one partial
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


@pytest.mark.parametrize("with_offset", [False, True], ids=["no-offset", "offset"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("bits", [1, 2, 3, 4], ids=lambda b: f"bits={b}")
def test_matches_reference(
    bits: int, layout: tuple[int, int, int | None], with_offset: bool
) -> None:
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, bits, with_offset)
    generator = torch.Generator().manual_seed(7)
    for shape in [(1, in_features), (3, in_features), (8, in_features), (1, 1, in_features)]:
        x = torch.randn(*shape, generator=generator)
        ref = bcq_matmul_reference(x, packed, alpha, offset, g, in_features)
        out_lut = bcq_matmul_lut(x, packed, alpha, offset, g, in_features)
        assert out_lut.shape == ref.shape == (*shape[:-1], out)
        assert out_lut.dtype == x.dtype
        torch.testing.assert_close(
            out_lut, ref, rtol=1e-4, atol=1e-4
        )  # only summation order differs


@pytest.mark.parametrize("layout", [(7, 100, None), (64, 576, 64)], ids=_layout_id)
def test_bf16_input_returns_bf16(layout: tuple[int, int, int | None]) -> None:
    out, in_features, group_size = layout
    packed, alpha, offset, g = _quantized(out, in_features, group_size, 3, with_offset=True)
    x = torch.randn(3, in_features).to(torch.bfloat16)
    ref = bcq_matmul_reference(x, packed, alpha, offset, g, in_features)
    out_lut = bcq_matmul_lut(x, packed, alpha, offset, g, in_features)
    assert out_lut.dtype == torch.bfloat16
    # Both compute in float32 and round once to bf16: at most one bf16 step apart.
    torch.testing.assert_close(out_lut.float(), ref.float(), rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("layout", [(300, 576, 64), (300, 100, None)], ids=_layout_id)
def test_threads_agree(
    layout: tuple[int, int, int | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks split over threads give the one-thread result exactly; torch keeps its threads."""
    monkeypatch.setattr(numba_lut, "_MIN_PARALLEL_LOOKUPS", 0)  # small layers run serially
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


def test_more_tokens_than_one_launch() -> None:
    """Inputs past the per-launch token chunk are processed in several launches."""
    packed, alpha, offset, g = _quantized(7, 576, 64, 3, with_offset=True)
    x = torch.randn(2, 11, 576)
    ref = bcq_matmul_reference(x, packed, alpha, offset, g, 576)
    torch.testing.assert_close(
        bcq_matmul_lut(x, packed, alpha, offset, g, 576), ref, rtol=1e-4, atol=1e-4
    )


def test_no_tokens() -> None:
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    y = bcq_matmul_lut(torch.empty(0, 64), packed, alpha, offset, g, 64)
    assert y.shape == (0, 7)


def test_alpha_requiring_grad_is_read_not_tracked() -> None:
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    alpha = alpha.clone().requires_grad_(True)
    x = torch.randn(1, 64)
    y = bcq_matmul_lut(x, packed, alpha, offset, g, 64)
    assert not y.requires_grad
    torch.testing.assert_close(
        y, bcq_matmul_reference(x, packed, alpha, offset, g, 64).detach(), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("in_features,group_size", [(16, 4), (24, 12)], ids=["g=4", "g=12"])
def test_groups_splitting_a_byte_are_refused(in_features: int, group_size: int) -> None:
    codes = torch.ones(2, 3, in_features, dtype=torch.int8)
    alpha = torch.ones(2, 3, in_features // group_size)
    with pytest.raises(KernelUnavailableError, match="multiple of 8"):
        bcq_matmul_lut(
            torch.randn(1, in_features), pack_codes(codes), alpha, None, group_size, in_features
        )


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


def test_missing_numba_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    assert numba_available()
    cause = ImportError("No module named 'numba'")
    monkeypatch.setattr(numba_lut, "numba", None)
    monkeypatch.setattr(numba_lut, "_NUMBA_IMPORT_ERROR", cause)
    assert not numba_lut.numba_available()
    packed, alpha, offset, g = _quantized(7, 64, None, 2, with_offset=False)
    with pytest.raises(KernelUnavailableError, match="pip install numba") as info:
        bcq_matmul_lut(torch.randn(1, 64), packed, alpha, offset, g, 64)
    assert info.value.__cause__ is cause


def test_module_imports_without_numba() -> None:
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "from alphatune.kernels import numba_lut\n"
        "assert not numba_lut.numba_available()\n"
        "assert isinstance(numba_lut._NUMBA_IMPORT_ERROR, ImportError)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
