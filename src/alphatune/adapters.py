"""Task adapters (the trained scales only): their files, and the verbs that put them on a model.

Verbs (peft's, as functions of the model; docs/peft.md says why not a peft tuner)::

    load_adapter(model, "runs/e2e", adapter_name="e2e")     # read, check, keep, activate
    load_adapter(model, "runs/webnlg", adapter_name="webnlg", activate=False)
    set_adapter(model, "webnlg")                             # switch: no file read
    active_adapter(model), adapter_names(model)              # "webnlg", ("e2e", "webnlg")
    delete_adapter(model, "e2e"); unload_adapter(model)      # forget one; back to the base

Adapter directory::

    adapter_config.json  "format": "alphatune_adapter", base fingerprint, the base's bit widths,
                         tuning config, tensor names and shapes, version, "metadata" (the
                         caller's: task, training arguments, metrics), "integrity" (hash of
                         every tensor and of the file itself)
    adapter.safetensors  the trained tensors (alpha1, ...), fp32

An adapter records the fingerprint of the base it was tuned on (``alphatune.bases``); loading it
onto another base is refused. Activating replaces tensors in place; their base values are kept
by the model's adapter registry (``alphatune.state``), so switching or unloading restores them. Names, the format version and the marker are defined in ``alphatune.files``.

The quantized base's files moved to ``alphatune.bases``; their names stay importable from here.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from alphatune.bases import (  # noqa: F401  (the base's names, importable from here as before)
    base_fingerprint,
    head_fingerprint,
    load_quantized,
    save_quantized,
)
from alphatune.config import AlphaTuningConfig
from alphatune.errors import CheckpointError, ConfigError
from alphatune.files import (  # noqa: F401  (file names and markers, importable from here)
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_MARKER,
    ADAPTER_MARKERS,
    ADAPTER_RECORD,
    ADAPTER_WEIGHTS,
    BASE_CONFIG,
    BASE_MARKER,
    BASE_MARKERS,
    BASE_RECORD,
    BASE_WEIGHTS,
    LIBRARY_VERSION,
    NEWEST_BASE_FORMAT,
    QUANT_METHOD,
    check_format_version,
    check_output_dir,
    kind_of,
    nonfinite,
    read_json,
    read_safetensors,
    seal,
    verify_document,
    verify_tensors,
    write_files,
)
from alphatune.lm_head import replaced_head_module
from alphatune.quantize import quantized_layers
from alphatune.state import ResidentAdapter, existing_state, model_state, tensors_by_name
from alphatune.tuning import (
    absent_multipliers,
    add_multipliers,
    multiplier_granularity,
    trainable_state,
)

logger = logging.getLogger(__name__)

# The name an adapter is resident under when ``load_adapter`` is given none (peft's, too).
DEFAULT_ADAPTER = "default"

# Older names of what alphatune.files defines.
QUANT_METHOD_NAME = QUANT_METHOD
FORMAT_VERSION = ADAPTER_FORMAT_VERSION
BASE_FORMAT_VERSION = NEWEST_BASE_FORMAT


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
        "format_version": ADAPTER_FORMAT_VERSION,
        "alphatune_version": LIBRARY_VERSION,
        "base_fingerprint": base_fingerprint(model),
        "bits": base_bits(model),
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


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by name as it is with no adapter loaded (``load_adapter``
    replaces some in place and keeps their base values aside)."""
    return model_state(model).base_state(model)


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
    # First: a newer format may seal its files differently.
    check_format_version(config, ADAPTER_FORMAT_VERSION, path)
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
    targets = tensors_by_name(model)
    absent = absent_multipliers(model)  # an adapter trained with α₁ multipliers creates them
    for name, tensor in tensors.items():
        if name in absent:
            if multiplier_granularity(absent[name], tensor.shape) is None:
                raise CheckpointError(
                    f"{weights}: {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{absent[name].multiplier_shape('row')} or "
                    f"{absent[name].multiplier_shape('group')}"
                )
            continue
        if name not in targets:
            raise CheckpointError(f"{weights}: tensor {name!r} has no place in this model")
        if targets[name].shape != tensor.shape:
            raise CheckpointError(
                f"{weights}: {name!r} has shape {tuple(tensor.shape)}, the "
                f"model expects {tuple(targets[name].shape)}"
            )
    return config, tensors


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    activate: bool = True,
) -> dict[str, Any]:
    """Read an adapter, keep it resident under ``adapter_name`` and (by default) make it active.

    The adapter is checked against the model (base fingerprint, every tensor's hash, names and
    shapes) before anything changes; a wrong-base adapter is refused naming both fingerprints.
    Several adapters stay resident at once, each only its trained tensors (α₁: a few MB);
    ``set_adapter`` switches between them without reading a file, ``delete_adapter`` forgets
    one, and ``alphatune.evaluate.generate(..., adapters=[...])`` serves a batch whose rows use
    different resident adapters. Loading under a name already resident replaces that adapter.

    Unlike peft's ``load_adapter``, the adapter becomes active unless ``activate=False``: one
    call loads an adapter and serves it, as it always has in alphatune.

    Returns:
        The adapter's config (JSON): format, base fingerprint, tuning, metadata.

    Raises:
        CheckpointError: an adapter for another base, a damaged file, a tensor with no place in
            the model (the file is named).
        ConfigError: an empty or non-string ``adapter_name``.
    """
    check_adapter_name(adapter_name)
    directory = Path(directory)
    config, tensors = read_adapter(model, directory)
    state = model_state(model)
    state.add_adapter(adapter_name, ResidentAdapter(directory, config, tensors))
    if activate or state.active == adapter_name:
        set_adapter(model, adapter_name)
    logger.info("adapter %r loaded from %s", adapter_name, directory)
    return config


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make the resident adapter ``adapter_name`` the active one (its tensors in the model).

    Whatever the previous adapter replaced is restored first, so nothing of it lingers.

    Raises:
        ConfigError: no adapter of that name is resident (the resident ones are named).
    """
    adapter = resident_adapter(model, adapter_name)
    add_multipliers(model, adapter.tensors)
    model_state(model).activate(model, adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Forget the resident adapter ``adapter_name``; if it was active, the base comes back.

    Raises:
        ConfigError: no adapter of that name is resident.
    """
    resident_adapter(model, adapter_name)
    model_state(model).remove_adapter(model, adapter_name)


def base_bits(model: nn.Module) -> list[int]:
    """The bit widths of the base's quantized layers (a replaced head left out), ascending."""
    head = replaced_head_module(model)
    return sorted({layer.bits for _, layer in quantized_layers(model) if layer is not head})


def unload_adapter(model: nn.Module) -> None:
    """Put back the base values of every tensor the active adapter replaced; the resident
    adapters stay (``set_adapter`` brings one back without reading its files)."""
    state = existing_state(model)
    if state is not None:
        state.deactivate(model)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter, or ``None`` when the model computes with its base."""
    state = existing_state(model)
    return None if state is None else state.active


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the resident adapters, in loading order."""
    state = existing_state(model)
    return () if state is None else tuple(state.adapters)


def resident_adapter(model: nn.Module, adapter_name: str) -> ResidentAdapter:
    """The resident adapter ``adapter_name`` (its directory, config and tensors).

    Raises:
        ConfigError: no adapter of that name is resident (the resident ones are named).
    """
    state = existing_state(model)
    adapters = {} if state is None else state.adapters
    if adapter_name not in adapters:
        loaded = ", ".join(map(repr, adapters)) or "none"
        raise ConfigError(
            f"no adapter named {adapter_name!r} is loaded on this model (loaded: {loaded}); "
            "load it with alphatune.load_adapter(model, directory, adapter_name=...)"
        )
    return adapters[adapter_name]


def check_adapter_name(adapter_name: object) -> None:
    """Refuse a name that is not a non-empty string (``ConfigError``)."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ConfigError(f"adapter names must be non-empty strings, got {adapter_name!r}")
