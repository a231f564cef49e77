"""Kernel dispatch: the decode kernel this CPU gets, ``ALPHATUNE_KERNEL``, what layers keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alphatune import kernels
from alphatune.config import BCQConfig
from alphatune.errors import ConfigError, KernelUnavailableError
from alphatune.kernels import avx2_lut, avx512_lut
from alphatune.layers import BCQLinear
from alphatune_runtime import avx2, avx512

needs_avx2 = pytest.mark.skipif(
    not avx2_lut.available(), reason="no numba or no AVX2 + FMA: the AVX2 LUT kernel cannot run"
)


@pytest.fixture(autouse=True)
def _default_kernel(monkeypatch: pytest.MonkeyPatch, single_thread) -> None:
    monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)


def _layer() -> BCQLinear:
    torch.manual_seed(0)
    linear = nn.Linear(100, 40)
    return BCQLinear.from_linear(linear, BCQConfig(bits=3, group_size=20, method="offset")).eval()


def _eval_layer() -> BCQLinear:
    """64 inputs in groups of 16: a layout the LUT kernels take."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 40)
    return BCQLinear.from_linear(linear, BCQConfig(bits=3, group_size=16, method="offset")).eval()


def test_default_is_the_best_kernel_this_cpu_runs() -> None:
    """The AVX2 int16 tables wherever AVX2 runs, AVX-512 CPUs included (faster there too)."""
    expected = "avx2-int16" if avx2_lut.available() else None
    assert kernels.lut_kernel() == expected
    assert kernels.lut_available() == (expected is not None)


def _spy(monkeypatch: pytest.MonkeyPatch, module) -> list[tuple]:
    """Record the arguments of every decoder ``module`` builds, once per decode call."""
    calls: list[tuple] = []
    real = module.decoder

    def spy(*args):
        decode = real(*args)

        def recorded(x, token_set=None):
            calls.append(args)
            return decode(x, token_set)

        return recorded

    monkeypatch.setattr(module, "decoder", spy)
    return calls


@needs_avx2
@pytest.mark.parametrize("choice", ["avx2", "avx2-int16", "avx2-int8"])
def test_forcing_the_avx2_kernel(choice: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode on the AVX2 kernel (on AVX-512 CPUs too), never through a dense weight."""
    monkeypatch.setenv(kernels.KERNEL_ENV, choice.upper())  # case does not matter
    assert kernels.lut_kernel() == choice
    calls = _spy(monkeypatch, avx2_lut)
    layer = _eval_layer()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
        expected = F.linear(x, layer.dequantize(), layer.bias)
    table_dtype = {"avx2-int8": torch.int8, "avx2-int16": torch.int16}.get(choice, torch.float32)
    assert len(calls) == 1 and calls[0][-1] == table_dtype  # decoder(codes, ..., table_dtype)
    assert "lut_codes" in layer._weight_cache and "dense" not in layer._weight_cache
    if choice == "avx2-int8":  # lossy, ~1% RMS
        sqnr_db = 10 * torch.log10(expected.square().sum() / (y - expected).square().sum())
        assert sqnr_db > 30.0
    else:  # float32, and int16 tables (within ~1e-4 relative)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_reference_keeps_the_dense_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """``reference``: no LUT kernel; eval-mode decode keeps the dense weight, as on other CPUs."""
    monkeypatch.setenv(kernels.KERNEL_ENV, "reference")
    assert kernels.lut_kernel() is None and not kernels.lut_available()
    layer = _eval_layer()
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = layer(x)
    assert "dense" in layer._weight_cache and "lut_codes" not in layer._weight_cache
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias))


@needs_avx2
def test_switching_kernels_rebuilds_the_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each kernel has its own layout (16 or 32 rows a block): a cached one is not reused."""
    layer = _eval_layer()
    x = torch.randn(1, 64)
    expected = F.linear(x, layer.dequantize(), layer.bias).detach()
    with torch.no_grad():
        monkeypatch.setenv(kernels.KERNEL_ENV, "avx2-int8")
        layer(x)
        monkeypatch.setenv(kernels.KERNEL_ENV, "avx2")
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        if avx512_lut.available():
            monkeypatch.setenv(kernels.KERNEL_ENV, "avx512")
            calls = _spy(monkeypatch, avx512_lut)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
            assert calls[0][0].codes.shape[-1] == avx512_lut.ROWS  # decoder(codes, ...)
            monkeypatch.setenv(kernels.KERNEL_ENV, "avx2")
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_groups_splitting_a_byte_decode_without_keeping_a_dense_weight() -> None:
    layer = _layer()  # groups of 20 inputs: no LUT kernel takes them
    x = torch.randn(1, 100)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias))
    if kernels.lut_available():
        assert "dense" not in layer._weight_cache


def test_unknown_kernel_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.KERNEL_ENV, "neon")
    with pytest.raises(ConfigError, match="avx512, avx2, avx2-int16, avx2-int8, reference"):
        kernels.lut_kernel()


def test_forcing_a_kernel_this_cpu_cannot_run_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(avx512, "available", lambda: False)
    monkeypatch.setenv(kernels.KERNEL_ENV, "avx512")
    with pytest.raises(KernelUnavailableError, match="AVX-512F"):
        kernels.lut_kernel()
    layer = _eval_layer()
    with pytest.raises(KernelUnavailableError, match="unset ALPHATUNE_KERNEL"), torch.no_grad():
        layer(torch.randn(1, 64))


def test_a_cpu_without_avx2_falls_back_to_the_dense_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """ARM or an older x86: neither LUT kernel reports itself available; decode stays correct."""
    monkeypatch.setattr(avx512, "available", lambda: False)
    monkeypatch.setattr(avx2, "available", lambda: False)
    assert kernels.lut_kernel() is None
    layer = _eval_layer()
    x = torch.randn(1, 64)
    with torch.no_grad():
        y = layer(x)
    assert "dense" in layer._weight_cache and "lut_codes" not in layer._weight_cache
    torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias))
