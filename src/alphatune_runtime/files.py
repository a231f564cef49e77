"""A base's file names and its integrity checks, without torch (``alphatune.files`` re-exports them).

- **Names and versions** of a quantized base: ``alphatune.files`` defines the rest of the file
  policy (markers, the overwrite guard, atomic writes) and imports these, never re-types them.
- **Integrity.** Every tensor (and every other file of a directory) gets a SHA-256 hash at save,
  recorded in the directory's JSON file, which is itself sealed by a hash of its own content.
  ``verify_document`` checks a JSON file's own hash, ``verify_digests`` the tensors' and
  ``verify_files`` the other files'; each error names the file and tensor that differ. Files
  written before hashes were recorded still load, with a warning.

A tensor's hash covers its dtype (by torch's name, ``torch.float16``: the name files have always
recorded), its shape and its bytes (``array_digest``), so numpy arrays read from a file hash
exactly as the tensors that were saved.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from alphatune_runtime.errors import CheckpointError

# Under "alphatune": the CLI and users set that logger's level and filters for the whole library.
logger = logging.getLogger(f"alphatune.{__name__}")

# ---------------------------------------------------------------- names
BASE_CONFIG = "config.json"
BASE_WEIGHTS = "model.safetensors"
QUANT_METHOD = "alphatune_bcq"  # what a base's quantization_config says; what alphatune writes
QUANT_METHOD_ALIASES = ("bcq",)  # also a base when read (the name the issue tracker proposed)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "alphatune_adapter"
ADAPTER_FORMAT_VERSION = 1  # an adapter's "format_version" (the newest this version reads)
# The state-dict name of a compact head's own table (``alphatune.embedding.BCQHead.own_table``),
# under the head's module: what a base stores when the head does not share the embedding's table.
OWN_HEAD_TABLE = "own_table"
# Key of the integrity record in each JSON file (see ``alphatune.files.seal``).
INTEGRITY = "integrity"
# Where a base's config.json and an adapter's adapter_config.json keep their integrity record.
BASE_RECORD = ("quantization_config", INTEGRITY)
ADAPTER_RECORD = (INTEGRITY,)
# Hash functions by the name a file records. SHA-256 (truncated to 128 bits): CPUs with SHA
# extensions hash ~0.8 GB/s on one core, 4x BLAKE2b on the development machine; blake2b-128 files
# were written for a while and still verify.
HASHES: dict[str, Callable[[], Any]] = {
    "sha256-128": hashlib.sha256,
    "blake2b-128": lambda: hashlib.blake2b(digest_size=16),
}
HASH_ALGORITHM = "sha256-128"

# ---------------------------------------------------------------- format versions
# A base: 1, the original layout; 2, a base whose LM head was replaced ("head" in its
# quantization_config); 3, a base with a compact (8-bit BCQ table) embedding or head
# ("input_embedding" and/or a "compact" head; alphatune.embedding). Each base is written with the
# lowest version that describes it, so older alphatune versions read what they can.
BASE_FORMAT = 1
BASE_FORMAT_WITH_HEAD = 2
BASE_FORMAT_WITH_TABLES = 3
NEWEST_BASE_FORMAT = BASE_FORMAT_WITH_TABLES  # the newest base layout this version reads


def check_format_version(
    document: dict[str, Any], newest: int, where: Path, what: str = "format_version"
) -> None:
    """Raise unless ``document["format_version"]`` (1 when absent) is one this version reads.

    Checked before anything else of a file: a newer format may seal its files differently.
    """
    version = document.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version > newest:
        raise CheckpointError(
            f"{where}: {what} {version!r} is newer than this alphatune reads ({newest}); "
            "upgrade alphatune"
        )


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or unparsable file is a ``CheckpointError``."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is corrupted") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; the file is corrupted")
    return data


# ---------------------------------------------------------------- digests
def running_digest(dtype_name: str, shape: tuple[int, ...], algorithm: str = HASH_ALGORITHM) -> Any:
    """A hash of a tensor under way: its dtype's torch name and shape taken; ``update`` it with
    the tensor's bytes in order, then ``digest_text`` gives what ``bytes_digest`` would."""
    digest = HASHES[algorithm]()
    digest.update(f"{dtype_name}:{tuple(shape)};".encode())
    return digest


def digest_text(digest: Any) -> str:
    """The recorded form of a finished hash."""
    return digest.hexdigest()[:32]


def bytes_digest(
    dtype_name: str, shape: tuple[int, ...], data: memoryview, algorithm: str = HASH_ALGORITHM
) -> str:
    """Hash of a tensor given as its dtype's torch name, its shape and its bytes."""
    digest = running_digest(dtype_name, shape, algorithm)
    digest.update(data)
    return digest_text(digest)


def array_digest(array: np.ndarray, algorithm: str = HASH_ALGORITHM) -> str:
    """``bytes_digest`` of a numpy array, under the torch name of its dtype (as it was saved)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return bytes_digest(f"torch.{array.dtype.name}", array.shape, memoryview(flat.view(np.uint8)),
                        algorithm)  # fmt: skip


def file_digest(path: Path, algorithm: str = HASH_ALGORITHM) -> str:
    """Hash of a file's bytes."""
    digest = HASHES[algorithm]()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest_text(digest)


def json_digest(data: Any, algorithm: str = HASH_ALGORITHM) -> str:
    """Hash of a JSON value in canonical form (sorted keys, no spaces), so formatting is free."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    digest = HASHES[algorithm]()
    digest.update(text.encode())
    return digest_text(digest)


def record_in(document: dict[str, Any], at: tuple[str, ...]) -> Any:
    """The value at the path of keys ``at`` in ``document`` (None where a key is missing)."""
    found: Any = document
    for key in at:
        found = found.get(key) if isinstance(found, dict) else None
    return found


# ---------------------------------------------------------------- verifying
def verify_document(where: Path, document: dict[str, Any], at: tuple[str, ...]) -> dict | None:
    """Check the JSON hash of ``document`` (read from ``where``); return its integrity record.

    ``None`` for a file written before records existed (logged: its contents are unverified).
    """
    record = record_in(document, at)
    if record is None:
        logger.warning(
            "%s was written by an older alphatune without content hashes; its contents cannot be "
            "verified (save it again to add them)",
            where,
        )
        return None
    algorithm = record.get("algorithm") if isinstance(record, dict) else record
    if not isinstance(algorithm, str) or algorithm not in HASHES:
        raise CheckpointError(
            f"{where}: '{INTEGRITY}' names hash {algorithm!r}, this alphatune checks "
            f"{', '.join(HASHES)}; the file is corrupted or from a newer alphatune"
        )
    unsealed = copy.deepcopy(document)
    expected = record_in(unsealed, at).pop("json", None)
    if json_digest(unsealed, algorithm) != expected:
        raise CheckpointError(
            f"{where}: the content does not match the hash recorded in it; the file was changed "
            "or corrupted after it was saved (save it again from its source)"
        )
    return record


def expected_digests(where: Path, names: list[str], record: dict) -> dict[str, str]:
    """The hash ``record`` lists for each of ``names`` (the tensors read from ``where``); raises
    unless it lists exactly those names."""
    expected = record.get("tensors")
    if not isinstance(expected, dict):
        raise CheckpointError(f"{where}: its integrity record lists no tensor hashes; corrupted")
    missing = sorted(set(expected) - set(names))
    extra = sorted(set(names) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{where}: tensors differ from those recorded at save (missing {missing[:5]}, "
            f"unexpected {extra[:5]}); the file is corrupted"
        )
    return expected


def check_digest(where: Path, name: str, found: str, expected: str) -> None:
    """Raise unless tensor ``name`` of ``where`` hashes to what was recorded at save."""
    if found != expected:
        raise CheckpointError(
            f"{where}: tensor {name!r} does not match the hash recorded at save; the file is "
            "corrupted (save it again from its source)"
        )


def verify_digests(
    where: Path, names: list[str], digest_of: Callable[[str, str], str], record: dict | None
) -> None:
    """Compare the tensors ``names`` read from ``where`` with the hashes in ``record``.

    ``digest_of(name, algorithm)`` hashes one tensor; it is called only once the names match.
    """
    if record is None:
        return
    expected = expected_digests(where, names, record)
    for name in names:
        check_digest(where, name, digest_of(name, record["algorithm"]), expected[name])


def verify_files(directory: Path, record: dict | None) -> None:
    """Compare each file listed in ``record`` with its bytes in ``directory``."""
    if record is None:
        return
    expected = record.get("files", {})
    if not isinstance(expected, dict):
        raise CheckpointError(f"{directory}: its integrity record of files is corrupted")
    for name, digest in expected.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (it was saved with the directory)")
        if file_digest(path, record["algorithm"]) != digest:
            raise CheckpointError(
                f"{path} does not match the hash recorded at save; the file is corrupted"
            )
