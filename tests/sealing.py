"""For tests that edit a saved base or adapter on purpose: record the edit's hashes, as a save
would, so the load reaches the check under test instead of stopping at the integrity check."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from alphatune.adapters import ADAPTER_RECORD, BASE_RECORD
from alphatune.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_CONFIG, BASE_WEIGHTS, seal


def _reseal(config: Path, weights: Path, at: tuple[str, ...]) -> None:
    document = json.loads(config.read_text())
    parent = document
    for key in at[:-1]:
        parent = parent[key]
    old = parent.pop(at[-1])
    files = {name: config.parent / name for name in old.get("files", {})}
    document = seal(document, at, tensors=load_file(weights), files=files if files else None)
    config.write_text(json.dumps(document))


def reseal_base(directory: Path) -> None:
    _reseal(directory / BASE_CONFIG, directory / BASE_WEIGHTS, BASE_RECORD)


def reseal_adapter(directory: Path) -> None:
    _reseal(directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS, ADAPTER_RECORD)
