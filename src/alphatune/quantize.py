"""Model-level quantization: ``quantize_(model, config)`` swaps linear layers for ``BCQLinear``.

Targets: every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside a transformer block — any module that
has an element of an ``nn.ModuleList`` among its ancestors — filtered by the config's include and
exclude glob patterns. Embeddings, the LM head, norms and biases stay in full precision.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from alphatune.config import BCQConfig, QuantMethod
from alphatune.errors import ConfigError, UnsupportedModelError
from alphatune.gptq import fit_calibrated
from alphatune.layers import BCQLinear, fit_weight, linear_weight

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]  # (stage, done, total)

SCALE_BITS = 16  # scales and offsets are stored as fp16


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
    model_bytes: int  # whole model as stored: quantized layers + other params in fp32

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


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    )


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
        if not _is_linear(module) or isinstance(module, BCQLinear):
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
    hessians: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            h = x.T @ x
            hessians[name] = hessians[name] + h if name in hessians else h

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()  # dropout would add noise to the statistics
    try:
        with torch.inference_mode():
            total = (calibration.shape[0] + batch_size - 1) // batch_size
            for i, start in enumerate(range(0, calibration.shape[0], batch_size)):
                batch = calibration[start : start + batch_size]
                model(input_ids=batch.to(_model_device(model)))
                if on_batch:
                    on_batch(i + 1, total)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return hessians


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def summarize(model: nn.Module) -> QuantizationSummary:
    """Sizes and bits per weight of a (quantized) model."""
    layers = [m for m in model.modules() if isinstance(m, BCQLinear)]
    quantized = sum(m.in_features * m.out_features for m in layers)
    stored = 0
    for m in layers:
        scales = m.alpha1.numel() + m.alpha_rest.numel()
        scales += 0 if m.offset is None else m.offset.numel()
        stored += m.packed_codes.numel() + scales * SCALE_BITS // 8
        if m.bias is not None:
            stored += m.bias.numel() * 4
    seen: set[int] = set()
    other = 0
    for m in model.modules():
        if isinstance(m, BCQLinear):
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:  # tied weights count once
                seen.add(id(p))
                other += p.numel()
    bits_per_weight = 8 * stored / quantized if quantized else 0.0
    return QuantizationSummary(
        layers=len(layers),
        quantized_params=quantized,
        other_params=other,
        bits_per_weight=round(bits_per_weight, 4),
        quantized_bytes=stored,
        fp32_bytes=4 * quantized,
        fp16_bytes=2 * quantized,
        model_bytes=stored + 4 * other,
    )


def quantize_(
    model: nn.Module,
    config: BCQConfig | None = None,
    *,
    calibration: Tensor | None = None,
    progress: ProgressCallback | None = None,
) -> QuantizationSummary:
    """Quantize ``model`` in place with BCQ and return a summary of what changed.

    Args:
        model: a causal LM (any module whose transformer blocks use ``nn.Linear``/``Conv1D``).
        config: how to quantize; defaults to ``BCQConfig()``.
        calibration: ``(n_sequences, seq_len)`` token ids; needed by ``method="calibrated"``.
        progress: called as ``progress(stage, done, total)`` after each calibration batch
            (stage ``"calibrating"``) and after each layer (stage = the layer's name).

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
    group_sizes = {name: config.group_size_for(linear_weight(m)[0].shape[1]) for name, m in layers.items()}
    hessians: dict[str, Tensor] = {}
    if config.method == QuantMethod.CALIBRATED:
        if calibration is None:
            raise ConfigError(
                "method 'calibrated' needs calibration token ids (n_sequences, seq_len); pass "
                "calibration=... (the CLI uses --calibration FILE), or choose method='offset'"
            )
        on_batch = (lambda done, total: progress("calibrating", done, total)) if progress else None
        hessians = collect_hessians(model, layers, calibration, on_batch=on_batch)
    for i, (name, module) in enumerate(layers.items()):
        weight, bias = linear_weight(module)
        if config.method == QuantMethod.CALIBRATED:
            fitted = fit_calibrated(
                weight.float().cpu(), hessians.pop(name).cpu(), config.bits, group_sizes[name],
                config.iterations,
            )
        else:
            fitted = fit_weight(weight.float(), config, group_sizes[name])
        layer = BCQLinear.from_weight(fitted, bias).to(weight.device)
        layer.train(module.training)
        _set_submodule(model, name, layer)
        if progress:
            progress(name, i + 1, len(layers))
    summary = summarize(model)
    logger.info("quantized %d layers: %.3f bits per weight", summary.layers, summary.bits_per_weight)
    return summary


def quantized_layers(model: nn.Module) -> Iterable[tuple[str, BCQLinear]]:
    """``(name, layer)`` for every ``BCQLinear`` in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, BCQLinear))
