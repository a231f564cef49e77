"""Model-level quantization: ``quantize_(model, config)`` swaps linear layers for ``BCQLinear``.

Targets: every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside a transformer block — any module that
has an element of an ``nn.ModuleList`` among its ancestors — filtered by the config's include and
exclude glob patterns. Embeddings, norms and biases stay in full precision; so does the LM head
unless ``config.lm_head`` asks for a bf16 or BCQ head (``alphatune.lm_head``).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from alphatune.config import BCQConfig, LMHeadMode, QuantMethod
from alphatune.errors import ConfigError, UnsupportedModelError
from alphatune.gptq import fit_calibrated
from alphatune.layers import BCQLinear, fit_weight, is_linear, linear_weight
from alphatune.lm_head import check_lm_head, find_lm_head, quantize_lm_head, replaced_head_module
from alphatune.models import model_device

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class QuantizationSummary:
    """What ``quantize_`` did, with sizes in bytes."""

    layers: int
    quantized_params: int
    other_params: int
    bits_per_weight: float  # codes + scales + offsets, per quantized weight
    quantized_bytes: int  # packed codes + fp16 scales/offsets of the quantized layers
    fp32_bytes: int  # the same layers in fp32
    fp16_bytes: int
    model_bytes: int  # whole model as stored: quantized layers + head + other params as stored
    lm_head: str = LMHeadMode.KEEP.value  # a replaced head is not among the layers counted above
    lm_head_bytes: int = 0  # a replaced head as stored (a kept head counts with other_params)

    @property
    def compression_vs_fp32(self) -> float:
        return self.fp32_bytes / self.quantized_bytes

    @property
    def compression_vs_fp16(self) -> float:
        return self.fp16_bytes / self.quantized_bytes

    def to_dict(self) -> dict[str, float | int]:
        data: dict[str, float | int] = dict(asdict(self))
        data["compression_vs_fp32"] = round(self.compression_vs_fp32, 3)
        data["compression_vs_fp16"] = round(self.compression_vs_fp16, 3)
        return data


def find_target_layers(model: nn.Module, config: BCQConfig) -> dict[str, nn.Module]:
    """Linear layers ``quantize_`` would replace, by qualified name (in model order)."""
    in_block: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for child_name, _ in module.named_children():
                in_block.add(f"{name}.{child_name}" if name else child_name)

    def inside_block(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in in_block for i in range(1, len(parts)))

    targets = {}
    for name, module in model.named_modules():
        if not is_linear(module) or isinstance(module, BCQLinear):
            continue
        if config.include is not None:
            if not any(fnmatch.fnmatchcase(name, p) for p in config.include):
                continue
        elif not inside_block(name):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            continue
        targets[name] = module
    return targets


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextmanager
def _recording_hessians(layers: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """While active, accumulate ``Σ x xᵀ`` of every layer's input into the yielded dict."""
    hessians: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            h = x.T @ x
            hessians[name] = hessians[name] + h if name in hessians else h

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for calibration (dropout would add noise to the statistics), restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def collect_hessians(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Tensor,
    batch_size: int = 4,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor]:
    """``H = Σ_t x_t x_tᵀ`` of every target layer's input over calibration sequences.

    Args:
        calibration: ``(n_sequences, seq_len)`` token ids.
    """
    total = (calibration.shape[0] + batch_size - 1) // batch_size
    with _recording_hessians(layers) as hessians, _eval_mode(model), torch.inference_mode():
        for i, start in enumerate(range(0, calibration.shape[0], batch_size)):
            model(input_ids=calibration[start : start + batch_size].to(model_device(model)))
            if on_batch:
                on_batch(i + 1, total)
    return hessians


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the first block's inputs are captured."""


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


def _block_inputs(model: nn.Module, first_block: nn.Module, calibration: Tensor, batch_size: int):
    """Positional and keyword inputs of the first block, one entry per calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calibration.shape[0], batch_size):
            batch = calibration[start : start + batch_size].to(model_device(model))
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _replace_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _block_output(output: object) -> Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _quantize_sequentially(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibration: Tensor,
    fit_layer: Callable[[str, nn.Module, Tensor | None], None],
    batch_size: int = 4,
) -> set[str]:
    """GPTQ's layer-sequential calibration, one transformer block at a time.

    Each block's Hessians come from inputs that already went through the *quantized* earlier
    blocks, so later blocks learn to compensate earlier errors. Returns the names it quantized.
    """
    found = _transformer_blocks(model, layers)
    if found is None:
        return set()
    prefix, blocks = found
    done: set[str] = set()
    # no_grad, not inference_mode: the new layers' tensors must stay usable for training later.
    with _eval_mode(model), torch.no_grad():
        inputs = _block_inputs(model, blocks[0], calibration, batch_size)
        for index, block in enumerate(blocks):
            block_prefix = f"{prefix}.{index}."
            targets = {n: m for n, m in layers.items() if n.startswith(block_prefix)}
            if targets:
                with _recording_hessians(targets) as hessians:
                    for args, kwargs in inputs:
                        block(*args, **kwargs)
                for name, module in targets.items():
                    fit_layer(name, module, hessians.pop(name))
                    done.add(name)
            inputs = [
                _replace_hidden(args, kwargs, _block_output(block(*args, **kwargs)))
                for args, kwargs in inputs
            ]
    return done


def summarize(model: nn.Module) -> QuantizationSummary:
    """Sizes and bits per weight of a (quantized) model.

    A head replaced by ``config.lm_head`` is reported on its own (``lm_head_bytes``), not among
    the quantized layers or the other parameters.
    """
    head = replaced_head_module(model)
    layers = [m for m in model.modules() if isinstance(m, BCQLinear) and m is not head]
    quantized = sum(m.in_features * m.out_features for m in layers)
    stored = 0
    for m in layers:
        stored += m.storage_bytes()
    seen: set[int] = set()
    # Everything kept in full precision, biases of quantized layers included.
    other = other_bytes = 0
    for m in model.modules():
        if m is head:
            continue
        params = [m.bias] if isinstance(m, BCQLinear) and m.bias is not None else []
        if not isinstance(m, BCQLinear):
            params = list(m.parameters(recurse=False))
        for p in params:
            if id(p) not in seen:  # tied weights count once
                seen.add(id(p))
                other += p.numel()
                other_bytes += p.numel() * p.element_size()
    head_bytes = 0
    if head is not None:
        bias = head.bias
        head_bytes = 0 if bias is None else bias.numel() * bias.element_size()
        if isinstance(head, BCQLinear):
            head_bytes += head.storage_bytes()
        else:
            head_bytes += head.weight.numel() * head.weight.element_size()
    bits_per_weight = 8 * stored / quantized if quantized else 0.0
    return QuantizationSummary(
        layers=len(layers),
        quantized_params=quantized,
        other_params=other,
        bits_per_weight=round(bits_per_weight, 4),
        quantized_bytes=stored,
        fp32_bytes=4 * quantized,
        fp16_bytes=2 * quantized,
        model_bytes=stored + other_bytes + head_bytes,
        lm_head=LMHeadMode.KEEP.value if head is None else _head_mode(head),
        lm_head_bytes=head_bytes,
    )


def _head_mode(head: nn.Module) -> str:
    return (LMHeadMode.BCQ if isinstance(head, BCQLinear) else LMHeadMode.BF16).value


def quantize_(
    model: nn.Module,
    config: BCQConfig | None = None,
    *,
    calibration: Tensor | None = None,
    sequential: bool = True,
    progress: ProgressCallback | None = None,
) -> QuantizationSummary:
    """Quantize ``model`` in place with BCQ and return a summary of what changed.

    Args:
        model: a causal LM (any module whose transformer blocks use ``nn.Linear``/``Conv1D``).
        config: how to quantize; defaults to ``BCQConfig()``.
        calibration: ``(n_sequences, seq_len)`` token ids; needed by ``method="calibrated"``
            (a ``lm_head="bcq"`` head is then calibrated on the quantized blocks' outputs).
        sequential: calibrate block by block on the outputs of the already quantized blocks
            (GPTQ's sequential mode); ``False`` takes every layer's statistics from the
            unquantized model in one pass (faster, less accurate).
        progress: called as ``progress(stage, done, total)`` after each calibration batch
            (stage ``"calibrating"``) and after each layer (stage = the layer's name); the total
            counts a replaced LM head as one more layer.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64,
        ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
        >>> summary = quantize_(model, BCQConfig(bits=3, group_size=32, method="offset"))
        >>> summary.layers
        14
    """
    config = config or BCQConfig()
    layers = find_target_layers(model, config)
    if not layers:
        raise UnsupportedModelError(
            f"no linear layers to quantize in {type(model).__name__} (include={config.include}, "
            f"exclude={config.exclude}); pass include patterns naming its linear layers"
        )
    group_sizes = {
        name: config.group_size_for(linear_weight(m)[0].shape[1]) for name, m in layers.items()
    }
    if config.lm_head != LMHeadMode.KEEP:
        check_lm_head(model, config, has_calibration=calibration is not None)
        head_name, _ = find_lm_head(model)
        if head_name in layers:
            raise ConfigError(
                f"lm_head={config.lm_head.value!r} and the include patterns both quantize "
                f"{head_name!r}; drop it from include (or use lm_head='keep')"
            )
    total = len(layers) + (config.lm_head != LMHeadMode.KEEP)
    done: list[str] = []

    def fit_layer(name: str, module: nn.Module, hessian: Tensor | None) -> None:
        weight, bias = linear_weight(module)
        if hessian is not None:
            fitted = fit_calibrated(
                weight.float().cpu(),
                hessian.cpu(),
                config.bits,
                group_sizes[name],
                config.iterations,
            )
        else:
            fitted = fit_weight(weight.float(), config, group_sizes[name])
        layer = BCQLinear.from_weight(fitted, bias).to(weight.device)
        layer.train(module.training)
        _set_submodule(model, name, layer)
        done.append(name)
        if progress:
            progress(name, len(done), total)

    if config.method == QuantMethod.CALIBRATED:
        if calibration is None:
            raise ConfigError(
                "method 'calibrated' needs calibration token ids (n_sequences, seq_len); pass "
                "calibration=... (the CLI uses --calibration FILE), or choose method='offset'"
            )
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ConfigError(
                "calibration must be integer token ids of shape (n_sequences, seq_len), got "
                f"{calibration.dtype} {tuple(calibration.shape)}"
            )
        if sequential:
            _quantize_sequentially(model, layers, calibration, fit_layer)
        rest = {n: m for n, m in layers.items() if n not in done}
        if rest:
            on_batch = (lambda d, t: progress("calibrating", d, t)) if progress else None
            hessians = collect_hessians(model, rest, calibration, on_batch=on_batch)
            for name, module in rest.items():
                fit_layer(name, module, hessians.pop(name))
    else:
        for name, module in layers.items():
            fit_layer(name, module, None)
    record = quantize_lm_head(
        model,
        config,
        calibration=calibration,
        progress=(lambda stage: progress(stage, len(done), total)) if progress else None,
    )
    if record is not None and progress:
        progress(record.module, total, total)
    summary = summarize(model)
    logger.info(
        "quantized %d layers: %.3f bits per weight", summary.layers, summary.bits_per_weight
    )
    return summary


def quantized_layers(model: nn.Module) -> Iterable[tuple[str, BCQLinear]]:
    """``(name, layer)`` for every ``BCQLinear`` in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, BCQLinear))
