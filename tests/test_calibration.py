"""Calibration passes (``alphatune.calibration``): the Hessians they record are the plain ``XᵀX``."""

from __future__ import annotations

import pytest
import torch

from alphatune.calibration import collect_hessians, recording_hessians, run_batches
from alphatune.config import BCQConfig
from alphatune.quantize import find_target_layers
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
