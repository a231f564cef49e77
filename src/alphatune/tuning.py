"""Choosing what AlphaTuning trains: freeze everything, then unfreeze the chosen scales.

An LM head replaced through ``BCQConfig.lm_head`` (bf16 or BCQ) stays frozen: the paper tunes the
scales of the block linears only, and a head's α would put ``vocab × groups`` more parameters
into every adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import Tensor, nn

from alphatune.config import AlphaGradScale, AlphaTuningConfig, Granularity, TrainableScales
from alphatune.embedding import BCQTable
from alphatune.errors import ConfigError
from alphatune.layers import ALPHA1_SCALE, BCQLinear
from alphatune.lm_head import replaced_head, replaced_head_module

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainableReport:
    """How many parameters train, out of how many the model has."""

    trainable: int
    total: int

    @property
    def ratio(self) -> float:
        """Total / trainable (the paper's "x fewer trainable parameters")."""
        return self.total / max(self.trainable, 1)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def _count_total(model: nn.Module) -> int:
    """Parameters of the model as it was before quantization (quantized layers count in×out)."""
    total = 0
    seen: set[int] = set()
    record, head = replaced_head(model), replaced_head_module(model)
    copies = set()  # an untied head is a copy of the input embedding, which counts already
    if head is not None and record is not None and record.untied:
        copies = {id(m) for m in head.modules()}
    for module in model.modules():
        if id(module) in copies:
            continue
        if isinstance(module, BCQTable):  # a compact embedding (or head) table: rows x dim
            total += module.spec.rows * module.spec.dim
            continue
        if isinstance(module, BCQLinear):
            total += module.in_features * module.out_features
            total += 0 if module.bias is None else module.bias.numel()
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def prepare_for_alphatuning(
    model: nn.Module, config: AlphaTuningConfig | None = None
) -> TrainableReport:
    """Freeze every parameter, then make the scales chosen by ``config`` trainable.

    Returns the trainable-parameter count and its ratio to the original model size.
    """
    config = config or AlphaTuningConfig()
    head = replaced_head_module(model)
    layers = [m for m in model.modules() if isinstance(m, BCQLinear) and m is not head]
    if not layers:
        raise ConfigError("the model has no BCQLinear layers: call quantize_(model, ...) first")
    if config.train_offset and all(m.offset is None for m in layers):
        raise ConfigError("train_offset=True but the model was quantized without offsets")
    for p in model.parameters():
        p.requires_grad_(False)
    multiplier = _multiplier_granularity(config)
    for layer in layers:
        layer.make_trainable(
            alpha_rest=config.train == TrainableScales.ALL_ALPHA,
            offset=config.train_offset,
            alpha1_scale=multiplier,
        )
        if multiplier is not None and layer.alpha1_scale.shape != layer.multiplier_shape(
            multiplier
        ):
            raise ConfigError(
                f"the model already carries per-{_other(multiplier)} α₁ multipliers (from an "
                f"earlier preparation or adapter); load a fresh base to train per-{multiplier} ones"
            )
        if multiplier is not None:
            layer.alpha1_scale.requires_grad_(True)
        else:
            layer.alpha1.requires_grad_(True)
        by_group = config.alpha_grad_scale == AlphaGradScale.GROUP_SIZE
        layer.alpha_grad_scale = 1.0 / layer.group_size if by_group else 1.0
        if config.train == TrainableScales.ALL_ALPHA and isinstance(layer.alpha_rest, nn.Parameter):
            layer.alpha_rest.requires_grad_(True)
        if config.train_offset and isinstance(layer.offset, nn.Parameter):
            layer.offset.requires_grad_(True)
        if config.train_bias and layer.bias is not None:
            layer.bias.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = TrainableReport(trainable=trainable, total=_count_total(model))
    logger.info("trainable parameters: %d (%.4f%%)", report.trainable, report.percent)
    return report


def _multiplier_granularity(config: AlphaTuningConfig) -> str | None:
    if config.granularity == Granularity.ROW:
        return "row"
    return "group" if config.multiplier else None


def _other(granularity: str) -> str:
    return "group" if granularity == "row" else "row"


def multiplier_granularity(layer: BCQLinear, shape: tuple[int, ...]) -> str | None:
    """``"row"`` or ``"group"`` when ``shape`` is one of ``layer``'s α₁ multiplier shapes."""
    for granularity in ("row", "group"):
        if tuple(shape) == layer.multiplier_shape(granularity):
            return granularity
    return None


def absent_multipliers(model: nn.Module) -> dict[str, BCQLinear]:
    """``name.alpha1_scale`` -> its layer, for each layer that has no α₁ multiplier yet.

    What an adapter trained with multipliers may hold for a model without them; checked before
    the model changes with ``multiplier_granularity``.
    """
    return {
        f"{name}.{ALPHA1_SCALE}": layer
        for name, layer in model.named_modules()
        if isinstance(layer, BCQLinear) and layer.alpha1_scale is None
    }


def add_multipliers(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Give the layers named by ``name.alpha1_scale`` entries a frozen multiplier of 1 shaped
    like the entry.

    A multiplier of 1 changes nothing, so unloading the adapter (which restores the value it
    found) leaves the model computing exactly what it did before.
    """
    for name, layer in absent_multipliers(model).items():
        if name in tensors:
            granularity = multiplier_granularity(layer, tensors[name].shape)
            layer.make_trainable(alpha1_scale=granularity)
            layer.alpha1_scale.requires_grad_(False)


def trainable_state(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name -> parameter for everything that trains (what an adapter or checkpoint stores)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
