"""Files: the quantized base (saved once) and task adapters (the trained scales only).

Base directory::

    config.json          Hugging Face config + "quantization_config" (BCQConfig, per-layer specs,
                         base fingerprint, alphatune version, and "head" when the LM head was
                         replaced: module, mode, untied, fingerprint of its codes)
    model.safetensors    packed codes (uint8), scales and offsets (fp16 when lossless), every
                         unquantized tensor; tied tensors are stored once
    tokenizer files

Adapter directory::

    adapter_config.json  base fingerprint, tuning config, tensor names and shapes, version
    adapter.safetensors  the trained tensors (alpha1, ...), fp32

The base fingerprint hashes every layer's packed codes and shape, so an adapter loaded onto a base
with different codes is refused instead of silently producing garbage. A head replaced through
``BCQConfig.lm_head`` is left out of it (the head is frozen and never in an adapter, so an
adapter tuned on a base works with any head); a BCQ head's codes have their own fingerprint,
checked on load.

Format versions of a base: 1, the original layout; 2, a base with a replaced LM head ("head"). A
base without a replaced head is still written as version 1, so older alphatune versions read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from alphatune.config import AlphaTuningConfig, BCQConfig, LMHeadMode
from alphatune.errors import CheckpointError, ConfigError
from alphatune.files import check_output_dir, write_files
from alphatune.layers import SCALE_NAMES, BCQLinear
from alphatune.lm_head import (
    BF16Linear,
    ReplacedHead,
    replaced_head,
    replaced_head_module,
    set_replaced_head,
    untie_word_embeddings,
)
from alphatune.models import prepare_tokenizer
from alphatune.quantize import _set_submodule, quantized_layers
from alphatune.tuning import trainable_state

logger = logging.getLogger(__name__)

QUANT_METHOD_NAME = "alphatune_bcq"
FORMAT_VERSION = 1
BASE_FORMAT_VERSION = 2  # the newest base layout this version reads (see the module docstring)
BASE_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BASE_MARKERS = ("config.json", BASE_WEIGHTS)
# An adapter directory may hold only a training checkpoint so far (see train.CHECKPOINT_DIR).
ADAPTER_MARKERS = (ADAPTER_CONFIG, "checkpoint/state.json")


def _library_version() -> str:
    from alphatune import __version__

    return __version__


def _fingerprint(layers: list[tuple[str, BCQLinear]]) -> str:
    digest = hashlib.sha256()
    for name, layer in layers:
        digest.update(
            f"{name}:{layer.out_features}x{layer.in_features}:{layer.group_size};".encode()
        )
        digest.update(layer.packed_codes.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(model: nn.Module) -> str:
    """Short hash of every quantized layer's name, shape and packed codes.

    A head replaced through ``BCQConfig.lm_head`` is left out (see ``head_fingerprint``).
    """
    head = replaced_head_module(model)
    return _fingerprint([(n, m) for n, m in quantized_layers(model) if m is not head])


def head_fingerprint(model: nn.Module) -> str | None:
    """Short hash of a replaced BCQ head's name, shape and codes; ``None`` for any other head."""
    record, head = replaced_head(model), replaced_head_module(model)
    if record is None or not isinstance(head, BCQLinear):
        return None
    return _fingerprint([(record.module, head)])


def _layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bits": m.bits,
            "group_size": m.group_size,
            "offset": m.offset is not None,
            "bias": m.bias is not None,
        }
        for name, m in quantized_layers(model)
    }


def _storage_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """State dict for saving: tied tensors once (aliases returned), scales fp16 when lossless."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        t = tensor.detach().cpu()
        if name.rsplit(".", 1)[-1] in SCALE_NAMES and t.dtype == torch.float32:
            half = t.to(torch.float16)
            if torch.equal(half.float(), t):  # store compactly only when nothing is lost
                t = half
        tensors[name] = t.contiguous()
    return tensors, aliases


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike[str],
    config: BCQConfig,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save a quantized model (packed codes, scales, unquantized tensors) as a base directory."""
    directory = Path(directory)
    if not any(True for _ in quantized_layers(model)):
        raise CheckpointError("the model has no BCQLinear layers; quantize it before saving")
    tensors, aliases = _storage_tensors(model)
    quantization_config = {
        "quant_method": QUANT_METHOD_NAME,
        **config.to_dict(),
        "layers": _layer_specs(model),
        "tied": aliases,
        "fingerprint": base_fingerprint(model),
        "alphatune_version": _library_version(),
    }
    head = replaced_head(model)
    if head is not None:
        # The model is the truth: the head may have been replaced after quantize_ (or not at all).
        quantization_config["lm_head"] = head.mode.value
        quantization_config["head"] = {**head.to_dict(), "fingerprint": head_fingerprint(model)}
        quantization_config["format_version"] = 2
    else:
        quantization_config["lm_head"] = "keep"

    check_output_dir(directory, BASE_MARKERS, overwrite)
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = quantization_config
    write_files(
        directory,
        {
            BASE_WEIGHTS: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            # config.json last: a directory with a config.json is a complete base.
            "config.json": lambda path: path.write_text(
                json.dumps(hf_config, indent=2, sort_keys=True)
            ),
        },
    )
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    logger.info("saved quantized base to %s", directory)
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is corrupted") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} cannot be read ({err}); it is truncated or corrupted"
        ) from err


def load_quantized(directory: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """Load a base saved by ``save_quantized``: returns ``(model, tokenizer or None)``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected a quantized base)")
    raw = _read_json(directory / "config.json")
    qconfig = raw.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD_NAME:
        raise CheckpointError(
            f"{directory / 'config.json'} has no alphatune quantization_config; create a base "
            "with 'alphatune quantize' first"
        )
    version = qconfig.get("format_version", 1)
    if not isinstance(version, int) or version > BASE_FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / 'config.json'}: base format_version {version!r} is newer than this "
            f"alphatune reads ({BASE_FORMAT_VERSION}); upgrade alphatune"
        )
    layers = qconfig.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{directory / 'config.json'}: quantization_config has no 'layers'")
    head = None
    if qconfig.get("head") is not None:
        try:
            head = ReplacedHead.from_dict(qconfig["head"], f"{directory / 'config.json'}: head")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    tensors = _read_safetensors(directory / BASE_WEIGHTS)
    hf_config = AutoConfig.from_pretrained(directory)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    if head is not None:
        untie_word_embeddings(hf_config)  # written untied; never let tie_weights() re-tie the head
    # Parameters on the meta device: nothing is allocated or initialised for the weights the
    # file replaces (an fp32 skeleton would cost the whole fp32 model's memory, and its RSS stays
    # after the quantized layers replace it). Buffers stay real: the non-persistent ones (rotary
    # frequencies) are computed here and are not in the file.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    for name, spec in layers.items():
        try:
            layer = BCQLinear(
                spec["in_features"],
                spec["out_features"],
                spec["bits"],
                spec["group_size"],
                spec["offset"],
                bias=spec["bias"],
            )
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{directory / 'config.json'}: layer {name!r} has an incomplete spec ({err}); "
                "expected in_features, out_features, bits, group_size, offset, bias"
            ) from err
        try:
            _set_submodule(model, name, layer)
        except AttributeError as err:
            raise CheckpointError(
                f"{directory / 'config.json'}: quantized layer {name!r} does not exist in "
                f"{type(model).__name__}"
            ) from err
    if head is not None:
        _install_head(model, head, layers, directory / "config.json")
    _load_into(model, tensors, qconfig.get("tied", {}), directory / BASE_WEIGHTS)
    model.eval()
    checks = [("fingerprint", base_fingerprint(model), qconfig.get("fingerprint"))]
    if head is not None and head.mode == LMHeadMode.BCQ:
        expected = qconfig["head"].get("fingerprint")
        checks.append(("head fingerprint", head_fingerprint(model), expected))
    for what, found, expected in checks:
        if found != expected:
            raise CheckpointError(
                f"{directory / BASE_WEIGHTS}: codes do not match the {what} recorded in "
                f"config.json ({found} vs {expected}); the base is corrupted"
            )
    tokenizer = None
    if (directory / "tokenizer_config.json").exists():
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
    return model, tokenizer


def _install_head(
    model: nn.Module, head: ReplacedHead, layers: dict[str, Any], where: Path
) -> None:
    """Put the replaced head's module in place (a BCQ head is already a layer spec) and mark it."""
    try:
        current = model.get_submodule(head.module)
    except AttributeError:
        raise CheckpointError(
            f"{where}: the LM head {head.module!r} does not exist in {type(model).__name__}"
        ) from None
    if head.mode == LMHeadMode.BCQ and head.module not in layers:
        raise CheckpointError(f"{where}: the BCQ head {head.module!r} has no layer spec")
    if head.mode == LMHeadMode.BF16:
        if type(current) is not nn.Linear:
            raise CheckpointError(
                f"{where}: the bf16 head {head.module!r} should replace an nn.Linear, found "
                f"{type(current).__name__}"
            )
        model.set_submodule(
            head.module,
            BF16Linear(current.in_features, current.out_features, bias=current.bias is not None),
        )
    set_replaced_head(model, head)


def _load_into(
    model: nn.Module, tensors: dict[str, Tensor], tied: dict[str, str], where: Path
) -> None:
    state = model.state_dict(keep_vars=True)
    missing = [n for n in state if n not in tensors and n not in tied]
    unexpected = [n for n in tensors if n not in state]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensors do not match the model; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    loaded: dict[str, Tensor] = {}
    converted: dict[int, Tensor] = {}  # id of a file tensor -> it in the model's dtype
    for name, target in state.items():
        source = tensors[tied.get(name, name)]
        if source.shape != target.shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {tuple(source.shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
        # Tied names get the very same tensor, so they stay tied after assignment.
        if id(source) not in converted:
            converted[id(source)] = source.to(target.dtype)
        loaded[name] = converted[id(source)]
    # assign: the model takes the loaded tensors (its parameters may be on the meta device).
    model.load_state_dict(loaded, strict=True, assign=True)
    model.tie_weights()


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    tuning: AlphaTuningConfig,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the trainable tensors (alpha1, ...) and a fingerprint of the base they belong to."""
    directory = Path(directory)
    tensors = {n: p.detach().cpu().float().contiguous() for n, p in trainable_state(model).items()}
    if not tensors:
        raise CheckpointError("nothing is trainable; call prepare_for_alphatuning(model) first")
    config = {
        "format_version": FORMAT_VERSION,
        "alphatune_version": _library_version(),
        "base_fingerprint": base_fingerprint(model),
        "tuning": tuning.to_dict(),
        "tensors": {n: list(t.shape) for n, t in tensors.items()},
        "metadata": metadata or {},
    }

    check_output_dir(directory, ADAPTER_MARKERS, overwrite)
    write_files(
        directory,
        {
            ADAPTER_WEIGHTS: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            ADAPTER_CONFIG: lambda path: path.write_text(
                json.dumps(config, indent=2, sort_keys=True)
            ),
        },
    )
    return directory


_BASE_VALUES = "_alphatune_base_values"


def _check_format(config: dict[str, Any], where: Path) -> None:
    version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version {version!r} is newer than this alphatune understands "
            f"({FORMAT_VERSION}); upgrade alphatune"
        )


def unload_adapter(model: nn.Module) -> None:
    """Put back the base values of every tensor an adapter replaced."""
    stash: dict[str, Tensor] = model.__dict__.get(_BASE_VALUES, {})
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, value in stash.items():
            targets[name].copy_(value)


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by name as it is with no adapter loaded (``load_adapter``
    replaces some in place and keeps their base values aside)."""
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: t.detach() for name, t in state.items()} | model.__dict__.get(_BASE_VALUES, {})


def read_adapter(
    model: nn.Module, directory: str | os.PathLike[str], fingerprint: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an adapter directory and check it against ``model``, without changing the model.

    Checks the format version, the base fingerprint (``fingerprint``, if given, saves hashing the
    base again when reading several adapters) and every tensor's name and shape.

    Returns:
        The adapter's config (JSON) and its tensors by state-dict name.
    """
    directory = Path(directory)
    config = _read_json(directory / ADAPTER_CONFIG)
    _check_format(config, directory / ADAPTER_CONFIG)
    expected = config.get("base_fingerprint")
    found = fingerprint or base_fingerprint(model)
    if expected != found:
        raise CheckpointError(
            f"{directory / ADAPTER_CONFIG}: adapter was tuned on base {expected}, this base is "
            f"{found}; load the base it was tuned on"
        )
    tensors = _read_safetensors(directory / ADAPTER_WEIGHTS)
    listed = config.get("tensors", {})
    missing = sorted(set(listed) - set(tensors))
    if missing:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS} lacks tensors {missing[:5]}")
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in tensors.items():
        if name not in targets:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: tensor {name!r} has no place in this model"
            )
        if targets[name].shape != tensor.shape:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: {name!r} has shape {tuple(tensor.shape)}, the "
                f"model expects {tuple(targets[name].shape)}"
            )
    return config, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an adapter's tensors into a quantized model; refuses a different base.

    Loading another adapter later first restores the base values of everything the previous one
    set, so nothing of an earlier adapter lingers. Returns the adapter's config (JSON).
    """
    config, tensors = read_adapter(model, directory)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    unload_adapter(model)
    stash: dict[str, Tensor] = model.__dict__.setdefault(_BASE_VALUES, {})
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in stash:
                stash[name] = targets[name].detach().clone()
            targets[name].copy_(tensor.to(targets[name].dtype))
    return config
