"""What alphatune writes, how it recognises its own files, and how it writes them safely.

One room for the file policy (the formats themselves live in ``bases.py``, ``adapters.py`` and
``train.py``):

- **Names, versions and markers.** Every file name, format version and marker is defined here and
  imported, never re-typed. A base, an adapter and a training checkpoint each carry a marker in one
  of their JSON files (``quant_method == "alphatune_bcq"``, ``format == "alphatune_adapter"``,
  ``format == "alphatune_checkpoint"``). A file name alone proves nothing: every Hugging Face
  model folder has a ``config.json``. A base whose ``quant_method`` is ``"bcq"`` (the short name
  also registered with transformers) is a base too; alphatune writes ``"alphatune_bcq"``, which
  every alphatune version reads.
- **Overwrite guard.** A non-empty directory is only written to with ``overwrite=True``, and only
  if it carries the marker of what is about to be written; an output that is, holds or sits
  inside an input is refused; writability is probed before any work starts.
- **Atomic writes.** Each file goes to a temporary name in its directory and is renamed over its
  target, so a crash never leaves a half-written file and files that are not ours are never
  touched. Whole directories (training checkpoints) are replaced by renaming the old one aside
  first, so one complete copy exists at every moment.
- **Integrity.** Every tensor (and every other file of a directory) gets a SHA-256 hash at save,
  recorded in the directory's JSON file, which is itself sealed by a hash of its own content. Load
  checks them and names the file and tensor that differ. Files written before hashes were
  recorded still load, with a warning.

A base's names and versions, the hashes and the checks are ``alphatune_runtime.files``' (the
torch-free runtime reads bases too); this module imports them, seals and hashes tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from alphatune.errors import CheckpointError
from alphatune.version import __version__
from alphatune_runtime.files import (  # noqa: F401  (names and checks, importable from here)
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_RECORD,
    ADAPTER_WEIGHTS,
    BASE_CONFIG,
    BASE_FORMAT,
    BASE_FORMAT_WITH_HEAD,
    BASE_FORMAT_WITH_TABLES,
    BASE_RECORD,
    BASE_WEIGHTS,
    HASH_ALGORITHM,
    HASHES,
    INTEGRITY,
    NEWEST_BASE_FORMAT,
    QUANT_METHOD,
    QUANT_METHOD_ALIASES,
    bytes_digest,
    check_format_version,
    file_digest,
    json_digest,
    read_json,
    record_in,
    verify_digests,
    verify_document,
    verify_files,
)

Writer = Callable[[Path], None]

# ---------------------------------------------------------------- names
# The adapter's folder inside a transformers Trainer checkpoint and, by default, inside its
# output directory (alphatune.hf_trainer.AdapterCallback).
ADAPTER_SUBDIR = "adapter"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_FORMAT = "alphatune_checkpoint"
# The library version every JSON file records (what wrote it).
LIBRARY_VERSION = __version__


# ---------------------------------------------------------------- markers
@dataclass(frozen=True)
class Marker:
    """Proof that alphatune wrote a directory: ``file`` is a JSON object holding ``value`` at ``key``.

    ``legacy_keys``: files written before the marker key existed are recognised by these top-level
    keys, all present (and the marker key absent).
    """

    kind: str
    file: str
    key: tuple[str, ...]
    value: str
    legacy_keys: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # other values that mark the same kind when read

    def found_in(self, directory: Path) -> bool:
        try:
            data = json.loads((directory / self.file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        found: Any = data
        for key in self.key:
            found = found.get(key) if isinstance(found, dict) else None
        if found == self.value or (isinstance(found, str) and found in self.aliases):
            return True
        return (
            bool(self.legacy_keys)
            and isinstance(data, dict)
            and self.key[0] not in data
            and all(key in data for key in self.legacy_keys)
        )


BASE_MARKER = Marker(
    "quantized base",
    BASE_CONFIG,
    ("quantization_config", "quant_method"),
    QUANT_METHOD,
    aliases=QUANT_METHOD_ALIASES,
)
ADAPTER_MARKER = Marker(
    "adapter",
    ADAPTER_CONFIG,
    ("format",),
    ADAPTER_FORMAT,
    legacy_keys=("base_fingerprint", "alphatune_version", "tensors"),
)


def _checkpoint_marker(folder: str) -> Marker:
    return Marker(
        "training checkpoint",
        f"{folder}/{CHECKPOINT_STATE}",
        ("format",),
        CHECKPOINT_FORMAT,
        legacy_keys=("step", "fingerprint", "train_config"),
    )


CHECKPOINT_MARKER = _checkpoint_marker(CHECKPOINT_DIR)
# An adapter directory may hold only a training checkpoint so far, or the ``.old`` copy an
# interrupted checkpoint swap leaves (see ``replace_directory``).
BASE_MARKERS = (BASE_MARKER,)
ADAPTER_MARKERS = (ADAPTER_MARKER, CHECKPOINT_MARKER, _checkpoint_marker(CHECKPOINT_DIR + ".old"))


def kind_of(directory: str | os.PathLike[str]) -> str | None:
    """What alphatune wrote in ``directory`` ("quantized base", "adapter", "training checkpoint")."""
    directory = Path(directory)
    for marker in (BASE_MARKER, *ADAPTER_MARKERS):
        if marker.found_in(directory):
            return marker.kind
    return None


# ---------------------------------------------------------------- output guards
def _same_or_nested(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _check_not_an_input(output: Path, inputs: Iterable[str | os.PathLike[str] | None]) -> None:
    target = output.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).resolve()
        if _same_or_nested(target, source):
            relation = (
                "is" if target == source else "holds" if target in source.parents else "is inside"
            )
            raise CheckpointError(
                f"the output {output} {relation} the input {given}; writing there could replace "
                "what is being read, choose another output"
            )


def check_writable(directory: Path) -> None:
    """Raise unless ``directory`` can be created (if absent) and written to; leaves no trace."""
    created: list[Path] = []
    existing = directory
    while not existing.exists() and existing != existing.parent:
        created.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointError(
            f"cannot write to {directory}: {existing} is a file, where a directory is expected; "
            "choose another path"
        )
    try:
        for folder in reversed(created):
            folder.mkdir()
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".alphatune-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise CheckpointError(
            f"cannot write to {directory} ({err.strerror or err}); choose a writable directory"
        ) from None
    finally:
        for folder in created:  # deepest first; probing leaves nothing behind
            try:
                folder.rmdir()
            except OSError:
                pass


def check_output_dir(
    directory: str | os.PathLike[str],
    markers: Iterable[Marker],
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Raise unless alphatune may write ``directory``: it must not be (or hold, or sit inside) one
    of ``inputs``, must be absent/empty, or ``overwrite`` and carrying one of ``markers``, and must
    be writable."""
    directory = Path(directory)
    markers = tuple(markers)
    _check_not_an_input(directory, inputs)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is a file; choose a directory path")
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{directory} exists and is not empty; choose another output directory or pass "
                "overwrite=True (--overwrite) to replace it"
            )
        if not any(marker.found_in(directory) for marker in markers):
            found = kind_of(directory)
            expected = "an alphatune " + " or ".join(dict.fromkeys(m.kind for m in markers))
            what = (
                f"holds an alphatune {found}, not {expected}"
                if found
                else f"is not empty and was not written by alphatune (it is not {expected})"
            )
            raise CheckpointError(
                f"{directory} {what}; refusing to overwrite it, choose another directory"
            )
    check_writable(directory)


def check_output_file(
    path: str | os.PathLike[str],
    overwrite: bool,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> None:
    """Raise unless ``path`` may be written: not an input (nor inside one), not a directory, absent
    unless ``overwrite``, and in a writable directory."""
    path = Path(path)
    _check_not_an_input(path, inputs)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a file path")
    if path.exists() and not overwrite:
        raise CheckpointError(
            f"{path} exists; choose another file or pass --overwrite to replace it"
        )
    check_writable(path.parent)


# ---------------------------------------------------------------- atomic writes
def write_files(directory: Path, writers: Mapping[str, Writer]) -> None:
    """Write each named file atomically (temporary name, then rename) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in writers.items():
        target = directory / name
        tmp = directory / f".{name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)


def write_file(path: str | os.PathLike[str], write: Writer) -> None:
    """Write one file atomically: ``write`` fills a temporary file that then replaces ``path``."""
    path = Path(path)
    write_files(path.parent, {path.name: write})


def replace_directory(directory: Path, write: Writer) -> None:
    """Build a new ``directory`` beside the old one and swap it in; a complete copy always exists."""
    new = directory.with_name(directory.name + ".new")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    write(new)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    new.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def existing_directory(directory: Path) -> Path | None:
    """``directory`` if it exists, else a complete ``.old`` copy left by an interrupted swap."""
    if directory.exists():
        return directory
    old = directory.with_name(directory.name + ".old")
    return old if old.exists() else None


# ---------------------------------------------------------------- reading
def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (never a pickle); unreadable is a ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    # A damaged header can fail anywhere in the parser (bad JSON, a dtype torch lacks, offsets
    # past the end); whatever the exception, the answer is the same: this file is unreadable.
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} cannot be read ({err}); it is truncated or corrupted"
        ) from err


# ---------------------------------------------------------------- integrity
def tensor_digest(tensor: Tensor, algorithm: str = HASH_ALGORITHM) -> str:
    """Hash of a tensor's dtype, shape and bytes: a flip anywhere changes it."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)  # reshape: a 0-d tensor cannot .view
    return bytes_digest(f"{tensor.dtype}", tuple(tensor.shape),
                        memoryview(flat.view(torch.uint8).numpy()), algorithm)  # fmt: skip


def seal(
    document: dict[str, Any],
    at: tuple[str, ...],
    tensors: Mapping[str, Tensor] | None = None,
    files: Mapping[str, Path] | None = None,
    algorithm: str = HASH_ALGORITHM,
) -> dict[str, Any]:
    """``document`` in its JSON form with an integrity record at ``at`` (a path of keys).

    The record holds the hash of every tensor and file given and, last, the hash of the whole
    document without that one entry, so the JSON file checks itself too.
    """
    document = json.loads(json.dumps(document))  # tuples -> lists, int keys -> str: as read back
    record: dict[str, Any] = {"algorithm": algorithm}
    if tensors is not None:
        record["tensors"] = {name: tensor_digest(t, algorithm) for name, t in tensors.items()}
    if files is not None:
        record["files"] = {name: file_digest(path, algorithm) for name, path in files.items()}
    parent = record_in(document, at[:-1])
    parent[at[-1]] = record
    record["json"] = json_digest(document, algorithm)
    return document


def verify_tensors(where: Path, tensors: Mapping[str, Tensor], record: dict | None) -> None:
    """Compare each tensor read from ``where`` with the hash in ``record`` (from ``seal``)."""
    verify_digests(
        where, list(tensors), lambda name, algorithm: tensor_digest(tensors[name], algorithm),
        record,
    )  # fmt: skip


def nonfinite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
