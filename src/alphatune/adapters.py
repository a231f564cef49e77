"""Files: the quantized base (saved once) and task adapters (the trained scales only).

Base directory::

    config.json          Hugging Face config + "quantization_config" (BCQConfig, per-layer specs,
                         base fingerprint, alphatune version, and "head" when the LM head was
                         replaced: module, mode, untied, fingerprint of its codes; "integrity":
                         a hash of every tensor and tokenizer file and of config.json itself)
    model.safetensors    packed codes (uint8), scales and offsets (fp16 when lossless), every
                         unquantized tensor; tied tensors are stored once
    tokenizer files

Adapter directory::

    adapter_config.json  "format": "alphatune_adapter", base fingerprint, tuning config, tensor
                         names and shapes, version, "integrity" (hash of every tensor and of
                         the file itself)
    adapter.safetensors  the trained tensors (alpha1, ...), fp32

The base fingerprint hashes every layer's packed codes and shape, so an adapter loaded onto a base
with different codes is refused instead of silently producing garbage. A head replaced through
``BCQConfig.lm_head`` is left out of it (the head is frozen and never in an adapter, so an
adapter tuned on a base works with any head); a BCQ head's codes have their own fingerprint,
checked on load.

The integrity hashes (``alphatune.files.seal``) catch what the fingerprint cannot: a flipped
byte in a scale, an embedding, a norm, an adapter or a JSON value. Files written before they were
recorded load with a warning. The markers ("quant_method": "alphatune_bcq", "format":
"alphatune_adapter") are what ``overwrite=True`` looks for: a directory without them is never
replaced.

Format versions of a base: 1, the original layout; 2, a base with a replaced LM head ("head"). A
base without a replaced head is still written as version 1, so older alphatune versions read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import Tensor, nn

from alphatune.config import AlphaTuningConfig, BCQConfig, LMHeadMode
from alphatune.errors import CheckpointError, ConfigError
from alphatune.files import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_MARKER,
    ADAPTER_MARKERS,
    ADAPTER_WEIGHTS,
    BASE_CONFIG,
    BASE_MARKER,
    BASE_MARKERS,
    BASE_WEIGHTS,
    INTEGRITY,
    QUANT_METHOD,
    check_output_dir,
    kind_of,
    nonfinite,
    read_json,
    read_safetensors,
    seal,
    verify_document,
    verify_files,
    verify_tensors,
    write_files,
)
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
from alphatune.tuning import absent_row_scales, add_row_scales, trainable_state

logger = logging.getLogger(__name__)

# File names and markers are defined in alphatune.files; these names stay for callers.
QUANT_METHOD_NAME = QUANT_METHOD
FORMAT_VERSION = 1
BASE_FORMAT_VERSION = 2  # the newest base layout this version reads (see the module docstring)
# Where each file's integrity record sits (see alphatune.files.seal).
BASE_RECORD = ("quantization_config", INTEGRITY)
ADAPTER_RECORD = (INTEGRITY,)


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


def _tokenizer_files(tokenizer: Any, staging: Path) -> dict[str, Path]:
    """Save ``tokenizer`` into ``staging``; returns its files by name (to be hashed and copied)."""
    if tokenizer is None:
        return {}
    tokenizer.save_pretrained(staging)
    return {path.name: path for path in sorted(staging.iterdir()) if path.is_file()}


def _copier(source: Path):
    return lambda path: shutil.copyfile(source, path)


def save_quantized(
    model: nn.Module,
    directory: str | os.PathLike[str],
    config: BCQConfig,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Save a quantized model (packed codes, scales, unquantized tensors) as a base directory.

    ``config.json`` records a hash of every tensor and tokenizer file (checked on load) and is
    written last, so a directory with a ``config.json`` is a complete base.
    """
    directory = Path(directory)
    if not any(True for _ in quantized_layers(model)):
        raise CheckpointError("the model has no BCQLinear layers; quantize it before saving")
    check_output_dir(directory, BASE_MARKERS, overwrite)
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

    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = quantization_config
    with tempfile.TemporaryDirectory(prefix="alphatune-tokenizer-") as staging:
        files = _tokenizer_files(tokenizer, Path(staging))
        document = seal(hf_config, BASE_RECORD, tensors=tensors, files=files)
        writers = {name: _copier(path) for name, path in files.items()}
        writers[BASE_WEIGHTS] = lambda path: save_file(tensors, path, metadata={"format": "pt"})
        # config.json last: a directory with a config.json is a complete base.
        writers[BASE_CONFIG] = lambda path: path.write_text(
            json.dumps(document, indent=2, sort_keys=True)
        )
        write_files(directory, writers)
    logger.info("saved quantized base to %s", directory)
    return directory


def _not_a_base(directory: Path) -> CheckpointError:
    """The error for a directory that is no base: say what it is, if alphatune wrote it."""
    kind = kind_of(directory)
    if kind == ADAPTER_MARKER.kind:
        return CheckpointError(
            f"{directory} is an alphatune adapter, not a quantized base; pass it as --adapter "
            "(load_adapter) and the base it was tuned on as --base (load_quantized)"
        )
    if kind is not None:
        return CheckpointError(
            f"{directory} holds only an alphatune {kind}, not a quantized base; finish the run "
            "with 'alphatune tune --resume' and pass its base as --base"
        )
    read_json(directory / BASE_CONFIG)  # a missing or unreadable config.json says so itself
    return CheckpointError(
        f"{directory / BASE_CONFIG} has no alphatune quantization_config; create a base "
        "with 'alphatune quantize' first"
    )


_SPEC_KEYS = ("in_features", "out_features", "bits", "group_size", "offset", "bias")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_layer_spec(name: str, spec: Any, where: Path) -> None:
    """Raise unless a layer spec of ``config.json`` describes a layer BCQLinear can build."""
    if not isinstance(spec, dict) or any(key not in spec for key in _SPEC_KEYS):
        raise CheckpointError(
            f"{where}: layer {name!r} has an incomplete spec; expected {', '.join(_SPEC_KEYS)}"
        )
    problems = [
        f"{key}={spec[key]!r} (expected a positive integer)"
        for key in ("in_features", "out_features", "group_size")
        if not _is_int(spec[key]) or spec[key] < 1
    ]
    if not _is_int(spec["bits"]) or not 1 <= spec["bits"] <= 8:
        problems.append(f"bits={spec['bits']!r} (expected an integer 1..8)")
    problems += [
        f"{key}={spec[key]!r} (expected true or false)"
        for key in ("offset", "bias")
        if not isinstance(spec[key], bool)
    ]
    if not problems and spec["in_features"] % spec["group_size"]:
        problems.append(
            f"group_size={spec['group_size']} (does not divide in_features={spec['in_features']})"
        )
    if problems:
        raise CheckpointError(
            f"{where}: layer {name!r} has an invalid spec: {'; '.join(problems)}; the base is "
            "corrupted, create it again with 'alphatune quantize'"
        )


def _check_base_format(qconfig: dict[str, Any], where: Path) -> None:
    version = qconfig.get("format_version", 1)
    if not _is_int(version) or version > BASE_FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: base format_version {version!r} is newer than this "
            f"alphatune reads ({BASE_FORMAT_VERSION}); upgrade alphatune"
        )


def _check_quantization_config(qconfig: dict[str, Any], where: Path) -> dict[str, Any]:
    """Validate what ``load_quantized`` builds from; returns the layer specs."""
    known = set(BCQConfig.__dataclass_fields__)
    try:
        BCQConfig.from_dict({k: v for k, v in qconfig.items() if k in known}, str(where))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{where}: quantization_config: {err}") from None
    layers = qconfig.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{where}: quantization_config has no 'layers'")
    for name, spec in layers.items():
        _check_layer_spec(name, spec, where)
    tied = qconfig.get("tied", {})
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        raise CheckpointError(f"{where}: quantization_config 'tied' must map names to names")
    return layers


def _load_tokenizer(directory: Path, record: dict | None) -> Any:
    """The base's tokenizer, or ``None`` if it was saved without one."""
    from transformers import AutoTokenizer

    if record is not None:
        present = "tokenizer_config.json" in record.get("files", {})
    else:
        present = (directory / "tokenizer_config.json").exists()
    if not present:
        return None
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
    # The tokenizer parsers raise plain Exception on malformed files; any failure here means the
    # same thing to the user.
    except Exception as err:
        raise CheckpointError(
            f"{directory}: the tokenizer files cannot be loaded ({type(err).__name__}: {err}); "
            "the base is incomplete or corrupted, create it again with 'alphatune quantize'"
        ) from err


def load_quantized(directory: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """Load a base saved by ``save_quantized``: returns ``(model, tokenizer or None)``.

    Every tensor and tokenizer file is checked against the hash recorded at save (a base written
    before hashes were recorded loads with a warning); a difference names the file and tensor.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected a quantized base)")
    if not BASE_MARKER.found_in(directory):
        raise _not_a_base(directory)
    config_path = directory / BASE_CONFIG
    raw = read_json(config_path)
    qconfig = raw["quantization_config"]
    _check_base_format(qconfig, config_path)  # first: a newer format may seal files differently
    record = verify_document(config_path, raw, BASE_RECORD)
    layers = _check_quantization_config(qconfig, config_path)
    head = None
    if qconfig.get("head") is not None:
        try:
            head = ReplacedHead.from_dict(qconfig["head"], f"{config_path}: head")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    tensors = read_safetensors(directory / BASE_WEIGHTS)
    verify_tensors(directory / BASE_WEIGHTS, tensors, record)
    verify_files(directory, record)
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{config_path}: not a Hugging Face model config ({err}); the base is corrupted"
        ) from err
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
        layer = BCQLinear(
            spec["in_features"],
            spec["out_features"],
            spec["bits"],
            spec["group_size"],
            spec["offset"],
            bias=spec["bias"],
        )
        try:
            _set_submodule(model, name, layer)
        except AttributeError as err:
            raise CheckpointError(
                f"{config_path}: quantized layer {name!r} does not exist in {type(model).__name__}"
            ) from err
    if head is not None:
        _install_head(model, head, layers, config_path)
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
    return model, _load_tokenizer(directory, record)


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
    """Save the trainable tensors (alpha1, ...) and a fingerprint of the base they belong to.

    ``adapter_config.json`` records a hash of every tensor (checked on load). Tensors holding NaN
    or infinity are refused: such an adapter could only produce garbage.
    """
    directory = Path(directory)
    tensors = {n: p.detach().cpu().float().contiguous() for n, p in trainable_state(model).items()}
    if not tensors:
        raise CheckpointError("nothing is trainable; call prepare_for_alphatuning(model) first")
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(
            f"refusing to save an adapter to {directory}: {', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''} hold NaN or infinity (training diverged?); "
            "train again with a lower learning rate"
        )
    config = {
        "format": ADAPTER_FORMAT,
        "format_version": FORMAT_VERSION,
        "alphatune_version": _library_version(),
        "base_fingerprint": base_fingerprint(model),
        "tuning": tuning.to_dict(),
        "tensors": {n: list(t.shape) for n, t in tensors.items()},
        "metadata": metadata or {},
    }
    check_output_dir(directory, ADAPTER_MARKERS, overwrite)
    try:
        document = seal(config, ADAPTER_RECORD, tensors=tensors)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"adapter metadata must be JSON data ({err})") from None
    write_files(
        directory,
        {
            ADAPTER_WEIGHTS: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            ADAPTER_CONFIG: lambda path: path.write_text(
                json.dumps(document, indent=2, sort_keys=True)
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


def _adapter_config(directory: Path) -> tuple[dict[str, Any], dict | None]:
    """An adapter's ``adapter_config.json`` and its integrity record, checked."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file() and directory.is_dir():
        kind = kind_of(directory)
        if kind == BASE_MARKER.kind:
            raise CheckpointError(
                f"{directory} is an alphatune quantized base, not an adapter; pass it as --base "
                "(load_quantized) and the adapter directory as --adapter (load_adapter)"
            )
        if kind is not None:
            raise CheckpointError(
                f"{directory} holds only an alphatune {kind}, no adapter yet; finish the run "
                "with 'alphatune tune --resume'"
            )
    config = read_json(path)
    _check_format(config, path)  # first: a newer format may seal its files differently
    record = verify_document(path, config, ADAPTER_RECORD)
    return config, record


def read_adapter(
    model: nn.Module, directory: str | os.PathLike[str], fingerprint: str | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read an adapter directory and check it against ``model``, without changing the model.

    Checks the format version, the base fingerprint (``fingerprint``, if given, saves hashing the
    base again when reading several adapters), every tensor's hash (recorded at save), name and
    shape, and that no value is NaN or infinite.

    Returns:
        The adapter's config (JSON) and its tensors by state-dict name.
    """
    directory = Path(directory)
    config, record = _adapter_config(directory)
    expected = config.get("base_fingerprint")
    found = fingerprint or base_fingerprint(model)
    if expected != found:
        raise CheckpointError(
            f"{directory / ADAPTER_CONFIG}: adapter was tuned on base {expected}, this base is "
            f"{found}; load the base it was tuned on"
        )
    weights = directory / ADAPTER_WEIGHTS
    tensors = read_safetensors(weights)
    listed = config.get("tensors", {})
    missing = sorted(set(listed) - set(tensors))
    if missing:
        raise CheckpointError(f"{weights} lacks tensors {missing[:5]}")
    verify_tensors(weights, tensors, record)
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(
            f"{weights}: {', '.join(bad[:3])} hold NaN or infinity; the adapter is unusable "
            "(its training diverged), train it again with a lower learning rate"
        )
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    targets |= absent_row_scales(model)  # a row-granularity adapter creates them on load
    for name, tensor in tensors.items():
        if name not in targets:
            raise CheckpointError(f"{weights}: tensor {name!r} has no place in this model")
        if targets[name].shape != tensor.shape:
            raise CheckpointError(
                f"{weights}: {name!r} has shape {tuple(tensor.shape)}, the "
                f"model expects {tuple(targets[name].shape)}"
            )
    return config, tensors


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an adapter's tensors into a quantized model; refuses a different base.

    Loading another adapter later first restores the base values of everything the previous one
    set, so nothing of an earlier adapter lingers. Returns the adapter's config (JSON).
    """
    config, tensors = read_adapter(model, directory)
    add_row_scales(model, tensors)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    unload_adapter(model)
    stash: dict[str, Tensor] = model.__dict__.setdefault(_BASE_VALUES, {})
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in stash:
                stash[name] = targets[name].detach().clone()
            targets[name].copy_(tensor.to(targets[name].dtype))
    return config
