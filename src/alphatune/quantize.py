"""Model-level quantization: ``quantize_(model, config)`` swaps linear layers for ``BCQLinear``.

How each layer is fitted is decided in ``alphatune.fitting`` (through ``BCQLinear.from_linear``);
the calibration passes live in ``alphatune.calibration``.

Targets: every ``nn.Linear`` (or GPT-2 ``Conv1D``) inside a transformer block — any module that
has an element of an ``nn.ModuleList`` among its ancestors — filtered by the config's include and
exclude glob patterns. Norms and biases stay in full precision. The input embedding and the LM
head become one compact 8-bit table by default (``config.embedding``, ``config.lm_head``; see
``alphatune.lm_head`` and ``alphatune.embedding``), or stay as they are with ``"keep"``.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from torch import Tensor, nn

from alphatune.calibration import (
    check_calibration,
    collect_hessians,
    quantize_sequentially,
    resolve_hessian_precision,
)
from alphatune.config import BCQConfig, EmbeddingMode, LMHeadMode, QuantMethod
from alphatune.embedding import BCQHead, compact_embedding
from alphatune.errors import ConfigError, UnsupportedModelError
from alphatune.layers import BCQLinear, is_linear, linear_weight
from alphatune.lm_head import check_lm_head, find_lm_head, quantize_lm_head, replaced_head_module
from alphatune.memory import own_mapped_tensors, release_free_memory
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
    lm_head_bytes: int = 0  # a replaced head as stored (a kept head counts with other_params;
    # a compact head sharing the embedding's table adds nothing: the table counts once, below)
    embedding: str = EmbeddingMode.KEEP.value
    embedding_bytes: int = 0  # a compact embedding's table (a kept one counts with other_params)
    embedding_params: int = 0  # its rows x dim (the weights it stands for)

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


def check_layer_bits(config: BCQConfig, layers: Iterable[str]) -> None:
    """Raise if a ``layer_bits`` pattern names none of the layers to quantize (a typo would
    otherwise quantize every layer at ``bits`` without a word)."""
    names = list(layers)
    for pattern, _ in config.layer_bits:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(
                f"layer_bits pattern {pattern!r} matches none of the {len(names)} layers to "
                f"quantize (e.g. {names[:2]}); patterns are globs over module names (the LM "
                "head takes lm_head_bits, and excluded layers are not quantized)"
            )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def summarize(model: nn.Module) -> QuantizationSummary:
    """Sizes and bits per weight of a (quantized) model.

    A head replaced by ``config.lm_head`` is reported on its own (``lm_head_bytes``), and so is a
    compact embedding (``embedding_bytes``), not among the quantized layers or the other
    parameters.
    """
    head = replaced_head_module(model)
    found = compact_embedding(model)
    table = None if found is None else found[1]
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
    embedding_bytes = 0 if table is None else table.storage_bytes()
    head_bytes = 0
    if head is not None:
        bias = head.bias
        head_bytes = 0 if bias is None else bias.numel() * bias.element_size()
        if isinstance(head, (BCQLinear, BCQHead)):
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
        model_bytes=stored + other_bytes + head_bytes + embedding_bytes,
        lm_head=LMHeadMode.KEEP.value if head is None else _head_mode(head),
        lm_head_bytes=head_bytes,
        embedding=(EmbeddingMode.KEEP if table is None else EmbeddingMode.COMPACT).value,
        embedding_bytes=embedding_bytes,
        embedding_params=0 if table is None else table.spec.rows * table.spec.dim,
    )


def _head_mode(head: nn.Module) -> str:
    if isinstance(head, BCQHead):
        return LMHeadMode.COMPACT.value
    return (LMHeadMode.BCQ if isinstance(head, BCQLinear) else LMHeadMode.BF16).value


def quantize_(
    model: nn.Module,
    config: BCQConfig | None = None,
    *,
    calibration: Tensor | None = None,
    sequential: bool = True,
    hessian_precision: str = "auto",
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
        hessian_precision: how the calibration passes that record the Hessians multiply:
            ``"auto"`` (default: bfloat16 inputs with float32 accumulation where the CPU
            multiplies bfloat16 natively, AVX-512 BF16 or AMX; float32 elsewhere), ``"float32"``
            or ``"bfloat16"`` (an error on a CPU without native bfloat16, where oneDNN would
            ignore it). On an Intel Xeon with AMX, bfloat16 quantized SmolLM2 at 3 bits
            in 0.86x the time at +0.3% perplexity (docs/performance.md); the pass that carries
            each block's outputs to the next stays float32.
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
    precision = resolve_hessian_precision(hessian_precision, model_device(model))
    layers = find_target_layers(model, config)
    if not layers:
        raise UnsupportedModelError(
            f"no linear layers to quantize in {type(model).__name__} (include={config.include}, "
            f"exclude={config.exclude}); pass include patterns naming its linear layers"
        )
    group_sizes = {
        name: config.group_size_for(linear_weight(m)[0].shape[1]) for name, m in layers.items()
    }
    check_layer_bits(config, layers)
    if config.lm_head in (LMHeadMode.BF16, LMHeadMode.BCQ):
        check_lm_head(model, config, has_calibration=calibration is not None)
        head_name, _ = find_lm_head(model)
        if head_name in layers:
            raise ConfigError(
                f"lm_head={config.lm_head.value!r} and the include patterns both quantize "
                f"{head_name!r}; drop it from include (or use lm_head='keep')"
            )
    total = len(layers) + (config.lm_head in (LMHeadMode.BF16, LMHeadMode.BCQ))
    done: list[str] = []

    def fit_layer(name: str, module: nn.Module, hessian: Tensor | None) -> None:
        layer = BCQLinear.from_linear(
            module,
            config,
            bits=config.bits_for(name),
            hessian=hessian,
            group_size=group_sizes[name],
        )
        _set_submodule(model, name, layer)
        done.append(name)
        if progress:
            progress(name, len(done), total)

    def fit_layer_and_trim(name: str, module: nn.Module, hessian: Tensor | None) -> None:
        fit_layer(name, module, hessian)
        release_free_memory()  # the fit's temporaries, freed between the codes that stay

    if config.method == QuantMethod.CALIBRATED:
        if calibration is None:
            raise ConfigError(
                "method 'calibrated' needs calibration token ids (n_sequences, seq_len); pass "
                "calibration=... (the CLI uses --calibration FILE), or choose method='offset'"
            )
        check_calibration(calibration)
        if sequential:
            # The heap is trimmed once a block, not once a layer: ~10 ms a call, 2 s of a
            # SmolLM2 quantization when done after each of its 210 layers (docs/performance.md).
            quantize_sequentially(
                model,
                layers,
                calibration,
                fit_layer,
                after_block=release_free_memory,
                precision=precision,
            )
        rest = {n: m for n, m in layers.items() if n not in done}
        if rest:
            on_batch = (lambda d, t: progress("calibrating", d, t)) if progress else None
            hessians = collect_hessians(
                model, rest, calibration, on_batch=on_batch, precision=precision
            )
            for name, module in rest.items():
                fit_layer_and_trim(name, module, hessians.pop(name))
    else:
        for name, module in layers.items():
            fit_layer_and_trim(name, module, None)
    record = quantize_lm_head(
        model,
        config,
        calibration=calibration,
        progress=(lambda stage: progress(stage, len(done), total)) if progress else None,
    )
    if record is not None and progress:
        progress(record.module, total, total)
    _attach_transformers_quantizer(model, config)
    own_mapped_tensors(model)  # the unquantized tensors no longer pin a mapped checkpoint
    release_free_memory()
    summary = summarize(model)
    logger.info(
        "quantized %d layers: %.3f bits per weight", summary.layers, summary.bits_per_weight
    )
    return summary


def _attach_transformers_quantizer(model: nn.Module, config: BCQConfig) -> None:
    """A transformers model gets the quantizer ``from_pretrained`` would give it, so that
    ``save_pretrained`` writes the packed base. Imported here, not at the top: the integration
    (``alphatune.hf``) is built on this module."""
    from alphatune.hf import attach_quantizer

    attach_quantizer(model, config)


def quantized_layers(model: nn.Module) -> Iterable[tuple[str, BCQLinear]]:
    """``(name, layer)`` for every ``BCQLinear`` in ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, BCQLinear))
