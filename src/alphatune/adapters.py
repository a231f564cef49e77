"""Files of task adapters (the trained scales only): save, read, load and unload one adapter.

Adapter directory::

    adapter_config.json  "format": "alphatune_adapter", base fingerprint, tuning config, tensor
                         names and shapes, version, "integrity" (hash of every tensor and of
                         the file itself)
    adapter.safetensors  the trained tensors (alpha1, ...), fp32

An adapter records the fingerprint of the base it was tuned on (``alphatune.bases``); loading it
onto another base is refused. Loading replaces tensors in place; their base values are kept by
the model's adapter registry (``alphatune.state``), so unloading or loading another adapter
restores them. Names, the format version and the marker are defined in ``alphatune.files``.

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
from alphatune.errors import CheckpointError
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
from alphatune.state import model_state, tensors_by_name
from alphatune.tuning import (
    absent_multipliers,
    add_multipliers,
    multiplier_granularity,
    trainable_state,
)

logger = logging.getLogger(__name__)

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


def unload_adapter(model: nn.Module) -> None:
    """Put back the base values of every tensor an adapter replaced."""
    model_state(model).restore(model)


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


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an adapter's tensors into a quantized model; refuses a different base.

    Loading another adapter later first restores the base values of everything the previous one
    set, so nothing of an earlier adapter lingers. Returns the adapter's config (JSON).
    """
    config, tensors = read_adapter(model, directory)
    add_multipliers(model, tensors)
    model_state(model).replace(model, tensors)
    return config
