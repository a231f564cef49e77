"""Calibration passes (``alphatune.calibration``): the Hessians they record are the plain ``XᵀX``."""

from __future__ import annotations

import pytest
import torch

from alphatune.calibration import collect_hessians, recording_hessians, run_batches
from alphatune.config import BCQConfig
from alphatune.quantize import find_target_layers
from alphatune_runtime.cpu import native_bfloat16
from tests.tiny_models import make_tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    """Tiny tensors: one thread avoids thread start-up on a busy machine."""


def _inputs_by_hand(model, layers, calibration):
    """Each layer's ``XᵀX`` from its own copy of the input: nothing shared between layers."""
    expected: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            expected[name] = expected.get(name, 0) + x.T @ x

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    with torch.no_grad():
        for batch in calibration.split(2):
            model(input_ids=batch)
    for handle in handles:
        handle.remove()
    return expected


def test_layers_fed_one_input_get_its_hessian_each() -> None:
    """q/k/v (and gate/up) read one tensor: their shared product equals each one's own, and the
    sums stay separate objects (accumulating one must not change another)."""
    model = make_tiny_llama(vocab_size=50).eval()
    layers = find_target_layers(model, BCQConfig())
    calibration = torch.randint(0, 50, (4, 16))
    expected = _inputs_by_hand(model, layers, calibration)
    for batch_size in (2, 4):  # two batches summed, or one product kept as it is
        hessians = collect_hessians(model, layers, calibration, batch_size=batch_size)
        assert hessians.keys() == expected.keys()
        for name, h in hessians.items():
            torch.testing.assert_close(h.double(), expected[name], rtol=1e-5, atol=1e-4)
        q, k, v = (
            hessians[n]
            for n in hessians
            if n.startswith("model.layers.0.self_attn.") and not n.endswith("o_proj")
        )
        assert q is not k and k is not v


def test_in_place_change_of_an_input_is_not_shared() -> None:
    """A layer whose input was changed in place since the last product gets a fresh one."""
    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    x = torch.ones(2, 3)
    with torch.no_grad(), recording_hessians({"first": first, "second": second}) as hessians:
        first(x)
        x.mul_(2)
        second(x)
    torch.testing.assert_close(hessians["first"], torch.full((3, 3), 2.0))
    torch.testing.assert_close(hessians["second"], torch.full((3, 3), 8.0))


def test_stop_ends_each_pass_once_every_layer_has_its_input() -> None:
    """With ``stop``, nothing after the last recorded layer runs, and the products are the same."""
    model = make_tiny_llama(vocab_size=50).eval()
    block = {n: m for n, m in find_target_layers(model, BCQConfig()).items() if ".layers.0." in n}
    calibration = torch.randint(0, 50, (4, 16))
    later = []
    model.model.layers[1].register_forward_pre_hook(lambda *_: later.append(1))
    with torch.no_grad(), recording_hessians(block, stop=True) as stopped:
        run_batches(model, calibration, batch_size=2)
    assert not later  # block 1 never ran
    full = collect_hessians(model, block, calibration, batch_size=2)
    assert later  # ... but it does without stop
    assert stopped.keys() == full.keys()
    for name, h in stopped.items():
        torch.testing.assert_close(h, full[name])


def test_a_block_pass_keeps_each_dense_weight_once_and_drops_it_after() -> None:
    """``keeping_dense_weights``: batches through a quantized layer give bit-identical outputs
    from one dequantization (kept while active, dropped on exit)."""
    from torch import nn

    from alphatune.calibration import keeping_dense_weights
    from alphatune.layers import BCQLinear

    torch.manual_seed(0)
    layer = BCQLinear.from_linear(
        nn.Linear(64, 48), BCQConfig(bits=3, group_size=16, method="offset")
    ).eval()
    batches = [torch.randn(4, 80, 64) for _ in range(3)]  # > 64 tokens: the batched path
    with torch.no_grad():
        expected = [layer(x) for x in batches]
        with keeping_dense_weights(layer):
            got = [layer(x) for x in batches]
            assert "dense" in layer._weight_cache
        assert "dense" not in layer._weight_cache and not layer._weight_cache.keep_dense
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _matmul_precision() -> str:
    return torch.backends.mkldnn.matmul.fp32_precision


needs_bf16_math = pytest.mark.skipif(
    not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
    reason="this torch has no oneDNN bf16 math mode (torch.backends.mkldnn.matmul.fp32_precision)",
)
needs_native_bf16 = pytest.mark.skipif(
    not native_bfloat16(),
    reason="this CPU has no native bfloat16 (AVX-512 BF16 or AMX): oneDNN ignores the bf16 mode",
)


def test_hessian_precision_resolves_by_value_device_and_cpu(monkeypatch) -> None:
    from alphatune import calibration
    from alphatune.errors import ConfigError

    cpu, meta = torch.device("cpu"), torch.device("meta")
    with pytest.raises(ConfigError, match=r"hessian_precision must be one of auto, float32"):
        calibration.resolve_hessian_precision("bf16", cpu)
    assert calibration.resolve_hessian_precision("float32", cpu) == "float32"
    assert calibration.resolve_hessian_precision("auto", meta) == "float32"  # not a CPU model
    with pytest.raises(ConfigError, match="needs a model on the CPU"):
        calibration.resolve_hessian_precision("bfloat16", meta)
    for native, expected in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(calibration, "native_bfloat16", lambda native=native: native)
        if calibration._mkldnn_matmul() is None:
            expected = "float32"
        assert calibration.resolve_hessian_precision("auto", cpu) == expected
    if calibration._mkldnn_matmul() is not None:
        # Asked for by name on a CPU without native bfloat16, where oneDNN would ignore it.
        monkeypatch.setattr(calibration, "native_bfloat16", lambda: False)
        with pytest.raises(ConfigError, match="needs a CPU that multiplies bfloat16 natively"):
            calibration.resolve_hessian_precision("bfloat16", cpu)


@needs_bf16_math
def test_recording_precision_sets_bf16_math_and_restores_it() -> None:
    from alphatune.calibration import recording_precision

    before = _matmul_precision()
    with recording_precision("float32"):
        assert _matmul_precision() == before
    with pytest.raises(RuntimeError), recording_precision("bfloat16"):
        assert _matmul_precision() == "bf16"
        raise RuntimeError("a failing pass")
    assert _matmul_precision() == before


@needs_bf16_math
@needs_native_bf16
def test_bfloat16_hessians_are_close_to_float32_ones() -> None:
    """bf16 inputs, float32 sums: each product within bf16's rounding of the exact one (measured
    ~0.3% of its largest entry here), still symmetric, and not the float32 result itself (the
    mode took effect)."""
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=50).eval()
    layers = find_target_layers(model, BCQConfig())
    calibration = torch.randint(0, 50, (4, 16))
    exact = collect_hessians(model, layers, calibration)
    rounded = collect_hessians(model, layers, calibration, precision="bfloat16")
    assert exact.keys() == rounded.keys()
    for name, h in rounded.items():
        scale = exact[name].abs().max()
        assert (h - exact[name]).abs().max() <= 0.02 * scale, name
        torch.testing.assert_close(h, h.T)
    assert any(not torch.equal(exact[n], rounded[n]) for n in exact)


@needs_bf16_math
def test_sequential_records_in_bf16_and_propagates_in_float32(monkeypatch) -> None:
    """Only the recording pass takes bfloat16 inputs: the outputs carried to the next block come
    from float32 arithmetic, and the setting is back after the quantization (the setting is what
    is checked, so any CPU will do: bfloat16 is taken as native)."""
    from alphatune import calibration
    from alphatune.calibration import quantize_sequentially

    monkeypatch.setattr(calibration, "native_bfloat16", lambda: True)
    model = make_tiny_llama(vocab_size=50).eval()
    layers = find_target_layers(model, BCQConfig())
    seen: dict[str, set[str]] = {"recording": set(), "propagating": set()}
    for module in layers.values():
        module.register_forward_pre_hook(lambda *_: seen["recording"].add(_matmul_precision()))
    for block in model.model.layers:
        block.register_forward_hook(lambda *_: seen["propagating"].add(_matmul_precision()))
    before = _matmul_precision()
    fitted = quantize_sequentially(
        model,
        layers,
        torch.randint(0, 50, (4, 16)),
        fit_layer=lambda *_: None,
        precision="bfloat16",
    )
    assert fitted == set(layers)
    # The layers also run in the propagating pass (float32); the recording pass sees bf16.
    assert seen["recording"] == {"bf16", before}
    assert seen["propagating"] == {before}
    assert _matmul_precision() == before


def test_native_bfloat16_is_false_without_llvmlite(monkeypatch) -> None:
    """numba (and its llvmlite) is an optional extra: without it the answer is the safe float32
    one, not an ImportError out of ``quantize_``."""
    import sys

    from alphatune_runtime.cpu import native_bfloat16

    monkeypatch.setitem(sys.modules, "llvmlite.binding", None)  # import fails
    assert native_bfloat16.__wrapped__() is False
