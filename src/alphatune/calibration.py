"""Calibration: forward passes over token ids that record what the calibrated method needs.

The one module with calibration hooks (``quantize_`` and the LM head both use it):

- ``recording_hessians``: while active, ``H = Σ_t x_t x_tᵀ`` of each chosen layer's input;
- ``run_batches``: the model over calibration batches, in eval mode (dropout would add noise to
  the statistics); a hook may end a pass early by raising ``StopForward``;
- ``quantize_sequentially``: GPTQ's layer-sequential mode, one transformer block at a time on the
  outputs of the already quantized blocks;
- ``recording_precision``: the float32 GEMMs of a recording pass with bfloat16 inputs
  (``HESSIAN_PRECISIONS``), where the CPU multiplies bfloat16 natively.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from alphatune.errors import ConfigError
from alphatune.models import model_device
from alphatune_runtime.cpu import native_bfloat16

# How the recording passes multiply: "float32", "bfloat16" (oneDNN's bf16 math mode: inputs
# rounded to bfloat16, float32 accumulation and output) or "auto" (bfloat16 on a CPU model where
# the CPU multiplies bfloat16 natively). On an Intel Xeon with AMX a SmolLM2 3-bit quantization
# took 0.86x the time (median of 14 side-by-side pairs; 54.8 s against 65.2 s in a quiet hour) at
# +0.3% perplexity (14 calibration draws, paired 95% interval -0.9% to +1.4%;
# benchmarks/results/quantize_speed_hessian_precision.json). The propagating pass, whose outputs
# feed the next block, stays float32: bf16 there had cost +2.3% (docs/performance.md).
HESSIAN_PRECISIONS = ("auto", "float32", "bfloat16")


def _mkldnn_matmul() -> Any:
    """torch's oneDNN matmul settings, or None where this torch has no ``fp32_precision``."""
    settings = getattr(torch.backends.mkldnn, "matmul", None)
    return settings if hasattr(settings, "fp32_precision") else None


def resolve_hessian_precision(precision: str, device: torch.device) -> str:
    """``"float32"`` or ``"bfloat16"``: the precision ``precision`` means for a model on ``device``
    (raises ``ConfigError`` on an unknown value or a bfloat16 this torch or device cannot run)."""
    if precision not in HESSIAN_PRECISIONS:
        raise ConfigError(
            f"hessian_precision must be one of {', '.join(HESSIAN_PRECISIONS)}; got {precision!r}"
        )
    runnable = device.type == "cpu" and _mkldnn_matmul() is not None
    if precision == "auto":
        return "bfloat16" if runnable and native_bfloat16() else "float32"
    if precision == "bfloat16" and not runnable:
        raise ConfigError(
            f"hessian_precision='bfloat16' needs a model on the CPU and torch's oneDNN bf16 math "
            f"mode (torch.backends.mkldnn.matmul.fp32_precision; torch {torch.__version__}, "
            f"model on {device.type}); use 'auto' or 'float32'"
        )
    if precision == "bfloat16" and not native_bfloat16():
        # oneDNN ignores the bf16 math mode on such a CPU (an AVX2-only AMD EPYC gave the float32
        # sums bit for bit): the request would silently change nothing.
        raise ConfigError(
            "hessian_precision='bfloat16' needs a CPU that multiplies bfloat16 natively (AVX-512 "
            "BF16 or AMX); oneDNN runs float32 on this one; use 'auto' or 'float32'"
        )
    return precision


@contextmanager
def recording_precision(precision: str) -> Iterator[None]:
    """While active, float32 GEMMs on the CPU take bfloat16-rounded inputs (accumulating and
    writing float32) if ``precision`` (resolved) is ``"bfloat16"``; the setting is restored."""
    if precision != "bfloat16":
        yield
        return
    settings = _mkldnn_matmul()
    before = settings.fp32_precision
    settings.fp32_precision = "bf16"
    try:
        yield
    finally:
        settings.fp32_precision = before


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed is recorded."""


def check_calibration(calibration: Tensor) -> None:
    """Raise unless ``calibration`` is integer token ids of shape ``(n_sequences, seq_len)``."""
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise ConfigError(
            "calibration must be integer token ids of shape (n_sequences, seq_len), got "
            f"{calibration.dtype} {tuple(calibration.shape)}"
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for calibration (dropout would add noise to the statistics), restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def recording_hessians(
    layers: dict[str, nn.Module], stop: bool = False
) -> Iterator[dict[str, Tensor]]:
    """While active, accumulate ``Σ x xᵀ`` (float32) of every layer's input into the yielded dict.

    ``stop``: end each forward pass (``StopForward``) once every recorded layer has its input:
    what runs after the last of them (its own product, the rest of the model) is not needed.
    """
    hessians: dict[str, Tensor] = {}
    # Layers fed the same tensor (q/k/v, gate/up in a Llama block) share one product: the last
    # input is held (so its memory cannot be reused by another tensor) and matched by identity.
    last: dict[str, Any] = {"input": None, "version": -1, "product": None}
    seen: set[str] = set()  # layers recorded in this pass; a layer seen again starts a new pass

    def product(x: Tensor) -> Tensor:
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if x.is_inference():  # no version counter: an in-place change could not be seen
            return flat.T @ flat
        if x is last["input"] and x._version == last["version"]:
            # A copy (small: in × in), so that no two layers' sums are one tensor.
            return last["product"].clone()
        last.update(input=x, version=x._version, product=flat.T @ flat)
        return last["product"]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            h = product(inputs[0])
            hessians[name] = hessians[name] + h if name in hessians else h
            if name in seen:
                seen.clear()
            seen.add(name)
            if stop and len(seen) == len(layers):
                seen.clear()
                raise StopForward

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()
        last.clear()


@contextmanager
def keeping_dense_weights(module: nn.Module) -> Iterator[None]:
    """While active, the quantized layers in ``module`` keep their dense weight between calls
    (``WeightCache.keep_dense``): a block run over every calibration batch dequantizes each
    layer once, not once per batch. The weights are dropped on exit."""
    caches = [m._weight_cache for m in module.modules() if hasattr(m, "_weight_cache")]
    for cache in caches:
        cache.keep_dense = True
    try:
        yield
    finally:
        for cache in caches:
            cache.keep_dense = False
            cache.clear()


def run_batches(
    model: nn.Module,
    calibration: Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int, int], None] | None = None,
    **forward_kwargs: Any,
) -> None:
    """``model(input_ids=batch, **forward_kwargs)`` for each calibration batch, on the model's
    device; a pass that a hook ends with ``StopForward`` counts as done."""
    total = (calibration.shape[0] + batch_size - 1) // batch_size
    for i, start in enumerate(range(0, calibration.shape[0], batch_size)):
        batch = calibration[start : start + batch_size].to(model_device(model))
        try:
            model(input_ids=batch, **forward_kwargs)
        except StopForward:
            pass
        if on_batch:
            on_batch(i + 1, total)


def collect_hessians(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int, int], None] | None = None,
    precision: str = "float32",
) -> dict[str, Tensor]:
    """``H = Σ_t x_t x_tᵀ`` of every target layer's input over calibration sequences.

    Args:
        calibration: ``(n_sequences, seq_len)`` token ids.
        precision: how the pass multiplies (``HESSIAN_PRECISIONS``).
    """
    precision = resolve_hessian_precision(precision, model_device(model))
    # no_grad, not inference_mode: inference tensors have no version counter, which the sharing
    # of one input's product between layers relies on.
    with (
        recording_hessians(layers) as hessians,
        eval_mode(model),
        torch.no_grad(),
        recording_precision(precision),
    ):
        run_batches(model, calibration, batch_size, on_batch)
    return hessians


def _transformer_blocks(
    model: nn.Module, layers: dict[str, nn.Module]
) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` holding the most target layers (the transformer blocks)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name:
            count = sum(1 for layer in layers if layer.startswith(name + "."))
            if count and (best is None or count > best[0]):
                best = (count, name, module)
    return None if best is None else (best[1], best[2])


def _block_inputs(
    model: nn.Module, first_block: nn.Module, calibration: Tensor, batch_size: int
) -> list[tuple[tuple, dict]]:
    """Positional and keyword inputs of the first block, one entry per calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_batches(model, calibration, batch_size, use_cache=False)
    finally:
        handle.remove()
    return captured


def _replace_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(output: object) -> Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def quantize_sequentially(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Tensor,
    fit_layer: Callable[[str, nn.Module, Tensor | None], None],
    batch_size: int = 4,
    after_block: Callable[[], None] | None = None,
    precision: str = "float32",
) -> set[str]:
    """GPTQ's layer-sequential calibration, one transformer block at a time.

    Each block's Hessians come from inputs that already went through the *quantized* earlier
    blocks, so later blocks learn to compensate earlier errors. ``fit_layer(name, module,
    hessian)`` replaces a layer; ``after_block()`` is called once each block's layers are fitted.
    ``precision`` (``HESSIAN_PRECISIONS``) applies to the recording pass only: the propagating
    pass, whose outputs are the next block's inputs, runs in float32.
    Returns the names it quantized (none without a block list).
    """
    precision = resolve_hessian_precision(precision, model_device(model))
    found = _transformer_blocks(model, layers)
    if found is None:
        return set()
    prefix, blocks = found
    done: set[str] = set()
    # no_grad, not inference_mode: the new layers' tensors must stay usable for training later.
    with eval_mode(model), torch.no_grad():
        inputs = _block_inputs(model, blocks[0], calibration, batch_size)
        for index, block in enumerate(blocks):
            block_prefix = f"{prefix}.{index}."
            targets = {n: m for n, m in layers.items() if n.startswith(block_prefix)}
            if targets:
                with (
                    recording_hessians(targets, stop=True) as hessians,
                    recording_precision(precision),
                ):
                    for args, kwargs in inputs:
                        try:
                            block(*args, **kwargs)  # ends at the last layer's input
                        except StopForward:
                            pass
                for name, module in targets.items():
                    fit_layer(name, module, hessians.pop(name))
                    done.add(name)
                if after_block:
                    after_block()
            with keeping_dense_weights(block):
                inputs = [
                    _replace_hidden(args, kwargs, _block_output(block(*args, **kwargs)))
                    for args, kwargs in inputs
                ]
    return done
