"""Files of the quantized base (saved once): ``save_quantized``, ``load_quantized``, fingerprints.

Base directory::

    config.json          Hugging Face config + "quantization_config" (BCQConfig, per-layer specs,
                         base fingerprint, alphatune version, "head" when the LM head was
                         replaced: module, mode, untied, fingerprint of its codes, and for a
                         compact head the embedding it shares or its own table's shape;
                         "input_embedding" for a compact embedding: module, table shape, scale;
                         "integrity": a hash of every tensor and tokenizer file and of
                         config.json itself)
    model.safetensors    packed codes (uint8), scales and offsets (fp16 when lossless), every
                         unquantized tensor; tied tensors are stored once, and a compact head
                         that shares the embedding's table has no tensors of its own
    tokenizer files

The base fingerprint hashes every layer's packed codes and shape, and a compact embedding's table
(codes, scales and offsets: it is what the blocks read), so an adapter loaded onto a base with
different codes or embedding is refused instead of silently producing garbage. A head replaced
through ``BCQConfig.lm_head`` is left out of it (the head is frozen and never in an adapter, so an
adapter tuned on a base works with any head); a BCQ or compact head's codes have their own
fingerprint, checked on load. Bases without a compact embedding keep the fingerprint they had.

The integrity hashes (``alphatune.files.seal``) catch what the fingerprint cannot: a flipped
byte in a scale, an embedding, a norm or a JSON value. Files written before they were recorded
load with a warning. Names, format versions (1; 2 with a replaced head; 3 with a compact
embedding or head) and the marker
(``"quant_method": "alphatune_bcq"``) are defined in ``alphatune.files``.

The pieces (``quantization_record``, ``storage_tensors``, ``check_quantization_config``,
``install_layers``, ``check_fingerprints``) are shared with the transformers integration
(``alphatune.hf``), which reads and writes the same files through ``from_pretrained`` and
``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
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

from alphatune.config import BCQConfig, EmbeddingMode, LMHeadMode
from alphatune.embedding import (
    TABLE_SCALE_NAMES,
    BCQEmbedding,
    BCQHead,
    BCQTable,
    EmbeddingRecord,
    compact_embedding,
)
from alphatune.errors import CheckpointError, ConfigError
from alphatune.files import (
    ADAPTER_MARKER,
    BASE_CONFIG,
    BASE_FORMAT,
    BASE_FORMAT_WITH_HEAD,
    BASE_FORMAT_WITH_TABLES,
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
from alphatune.memory import page_out, release_free_memory
from alphatune.models import prepare_tokenizer
from alphatune.quantize import _set_submodule, quantized_layers

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- identity
def _update(digest: Any, tensor: Tensor) -> None:
    """Hash a tensor's bytes in place (a copy of every layer's codes would raise peak memory)."""
    digest.update(memoryview(tensor.detach().cpu().contiguous().reshape(-1).numpy()))


def _fingerprint(
    layers: list[tuple[str, BCQLinear]], tables: list[tuple[str, BCQTable]] = ()
) -> str:
    digest = hashlib.sha256()
    for name, layer in layers:
        digest.update(
            f"{name}:{layer.out_features}x{layer.in_features}:{layer.group_size};".encode()
        )
        _update(digest, layer.packed_codes)
    for name, table in tables:  # none for bases without compact tables: their hash is unchanged
        digest.update(f"table {name}:{table.extra_repr()};".encode())
        for chunk in table.plane_chunks():  # the planes' bytes, as stored
            _update(digest, chunk)
        for tensor in (table.alpha, table.offset):
            _update(digest, tensor)
    return digest.hexdigest()[:16]


def base_fingerprint(model: nn.Module) -> str:
    """Short hash of every quantized layer's name, shape and packed codes, and of a compact
    embedding's table (codes and scales).

    A head replaced through ``BCQConfig.lm_head`` is left out (see ``head_fingerprint``).
    """
    head = replaced_head_module(model)
    embedding = compact_embedding(model)
    return _fingerprint(
        [(n, m) for n, m in quantized_layers(model) if m is not head],
        [] if embedding is None else [embedding],
    )


def head_fingerprint(model: nn.Module) -> str | None:
    """Short hash of a replaced BCQ or compact head's name, shape and codes (a compact head's
    table: its own or the embedding's it shares); ``None`` for any other head."""
    record, head = replaced_head(model), replaced_head_module(model)
    if record is None:
        return None
    if isinstance(head, BCQHead):
        return _fingerprint([], [(record.module, head.table)])
    if not isinstance(head, BCQLinear):
        return None
    return _fingerprint([(record.module, head)])


# ---------------------------------------------------------------- saving
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


_SCALES = (*SCALE_NAMES, *TABLE_SCALE_NAMES)  # stored fp16 when that loses nothing


def storage_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
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
        if name.rsplit(".", 1)[-1] in _SCALES and t.dtype == torch.float32:
            half = t.to(torch.float16)
            if torch.equal(half.float(), t):  # store compactly only when nothing is lost
                t = half
        tensors[name] = t.contiguous()
    return tensors, aliases


def _require_quantized(model: nn.Module) -> None:
    if not any(True for _ in quantized_layers(model)):
        raise CheckpointError("the model has no BCQLinear layers; quantize it before saving")


def quantization_record(
    model: nn.Module, config: BCQConfig, aliases: dict[str, str]
) -> dict[str, Any]:
    """The ``quantization_config`` a base's ``config.json`` holds (without its integrity record).

    The model is the truth: layer specs, fingerprints and the head come from it, not from
    ``config`` (the head may have been replaced after ``quantize_``, or not at all).
    """
    _require_quantized(model)
    record: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        **config.to_dict(),
        "layers": _layer_specs(model),
        "tied": aliases,
        "fingerprint": base_fingerprint(model),
        "alphatune_version": LIBRARY_VERSION,
        "format_version": BASE_FORMAT,
        "lm_head": LMHeadMode.KEEP.value,
        "embedding": EmbeddingMode.KEEP.value,
    }
    head = replaced_head(model)
    if head is not None:
        record["lm_head"] = head.mode.value
        record["head"] = {**head.to_dict(), "fingerprint": head_fingerprint(model)}
        record["format_version"] = BASE_FORMAT_WITH_HEAD
    embedding = compact_embedding(model)
    if embedding is not None:
        record["embedding"] = EmbeddingMode.COMPACT.value
        record["input_embedding"] = EmbeddingRecord.of(*embedding).to_dict()
    if embedding is not None or (head is not None and head.mode == LMHeadMode.COMPACT):
        record["format_version"] = BASE_FORMAT_WITH_TABLES
    return record


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
    _require_quantized(model)
    check_output_dir(directory, BASE_MARKERS, overwrite)
    tensors, aliases = storage_tensors(model)
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = quantization_record(model, config, aliases)
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


# ---------------------------------------------------------------- checking what is read
def not_a_base(directory: Path) -> CheckpointError:
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
    config = read_json(directory / BASE_CONFIG)  # a missing or unreadable one says so itself
    quantization = config.get("quantization_config")
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method is not None:
        return CheckpointError(
            f"{directory / BASE_CONFIG}: the model is quantized with {method!r}, not alphatune's "
            f"BCQ ({QUANT_METHOD!r}); load it with transformers, or quantize the original model "
            "with 'alphatune quantize'"
        )
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


def bcq_config(qconfig: dict[str, Any], where: str = "quantization_config") -> BCQConfig:
    """The ``BCQConfig`` of a base's ``quantization_config`` (its other keys are the record's)."""
    known = {field.name for field in dataclasses.fields(BCQConfig)}
    return BCQConfig.from_dict({k: v for k, v in qconfig.items() if k in known}, where)


def check_base_format(qconfig: dict[str, Any], where: Path) -> None:
    """Raise for a base written in a newer format (checked first: it may seal files otherwise)."""
    check_format_version(qconfig, NEWEST_BASE_FORMAT, where, what="base format_version")


def check_quantization_config(
    qconfig: dict[str, Any], where: Path
) -> tuple[dict[str, Any], ReplacedHead | None, EmbeddingRecord | None]:
    """Validate what a base is built from; returns the layer specs, the replaced head and the
    compact embedding."""
    try:
        bcq_config(qconfig, str(where))
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
    head = None
    if qconfig.get("head") is not None:
        try:
            head = ReplacedHead.from_dict(qconfig["head"], f"{where}: head")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    embedding = None
    if qconfig.get("input_embedding") is not None:
        embedding = EmbeddingRecord.from_dict(
            qconfig["input_embedding"], f"{where}: input_embedding"
        )
    if (
        head is not None
        and head.shares is not None
        and (embedding is None or embedding.module != head.shares)
    ):
        raise CheckpointError(
            f"{where}: the compact head {head.module!r} shares the table of {head.shares!r}, "
            "which is not the base's compact embedding; the base is corrupted"
        )
    return layers, head, embedding


# ---------------------------------------------------------------- building and loading
def install_layers(
    model: nn.Module,
    layers: dict[str, Any],
    head: ReplacedHead | None,
    where: Path,
    embedding: EmbeddingRecord | None = None,
) -> None:
    """Put an empty ``BCQLinear`` (and the replaced head's module, and the compact embedding)
    where the specs say.

    Everything is made on the meta device: nothing is allocated, the file's tensors are
    assigned afterwards.
    """
    for name, spec in layers.items():
        layer = BCQLinear(
            spec["in_features"],
            spec["out_features"],
            spec["bits"],
            spec["group_size"],
            spec["offset"],
            bias=spec["bias"],
            # Nothing allocated: the file's tensors are assigned (a zero-filled copy of every
            # layer would raise the peak memory of a load by the size of the codes).
            device="meta",
        )
        try:
            _set_submodule(model, name, layer)
        except AttributeError as err:
            raise CheckpointError(
                f"{where}: quantized layer {name!r} does not exist in {type(model).__name__}"
            ) from err
    compact = None if embedding is None else _install_embedding(model, embedding, where)
    if head is not None:
        _install_head(model, head, layers, where, compact)


def _install_embedding(model: nn.Module, record: EmbeddingRecord, where: Path) -> BCQEmbedding:
    """Put an empty ``BCQEmbedding`` (on the meta device) where the record says."""
    try:
        current = model.get_submodule(record.module)
    except AttributeError:
        raise CheckpointError(
            f"{where}: the input embedding {record.module!r} does not exist in "
            f"{type(model).__name__}"
        ) from None
    if not isinstance(current, nn.Embedding) or (
        current.num_embeddings,
        current.embedding_dim,
    ) != (record.table.rows, record.table.dim):
        found = tuple(getattr(current, "weight", torch.empty(0)).shape)
        raise CheckpointError(
            f"{where}: input_embedding {record.module!r} is a {record.table.rows}x"
            f"{record.table.dim} table, but the model's {type(current).__name__} has shape "
            f"{found}; the base is corrupted or its config does not match"
        )
    compact = BCQEmbedding(record.table, scale=record.scale, device="meta")
    model.set_submodule(record.module, compact)
    return compact


def _install_head(
    model: nn.Module,
    head: ReplacedHead,
    layers: dict[str, Any],
    where: Path,
    embedding: BCQEmbedding | None = None,
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
    if head.mode == LMHeadMode.COMPACT:
        if head.shares is not None:
            assert embedding is not None  # check_quantization_config
            new = BCQHead.sharing(embedding, bias=head.bias)
        else:
            assert head.table is not None  # ReplacedHead.from_dict
            new = BCQHead.owning(BCQTable(head.table, device="meta"), bias=head.bias)
        shape = (getattr(current, "out_features", None), getattr(current, "in_features", None))
        if type(current) is not nn.Linear or shape != (new.out_features, new.in_features):
            raise CheckpointError(
                f"{where}: the compact head {head.module!r} is a {new.out_features}x"
                f"{new.in_features} table, but the model's {type(current).__name__} there has "
                f"(out, in) = {shape}; the base is corrupted or its config does not match"
            )
        if head.bias:
            new.bias = nn.Parameter(
                torch.empty(new.out_features, device="meta"), requires_grad=False
            )
        model.set_submodule(head.module, new)
    set_replaced_head(model, head)


def check_fingerprints(model: nn.Module, qconfig: dict[str, Any], weights: Path) -> None:
    """Raise unless the loaded codes match the fingerprints ``config.json`` recorded."""
    checks = [("fingerprint", base_fingerprint(model), qconfig.get("fingerprint"))]
    head = replaced_head(model)
    if head is not None and head.mode in (LMHeadMode.BCQ, LMHeadMode.COMPACT):
        expected = qconfig["head"].get("fingerprint")
        checks.append(("head fingerprint", head_fingerprint(model), expected))
    for what, found, expected in checks:
        if found != expected:
            raise CheckpointError(
                f"{weights}: codes do not match the {what} recorded in config.json ({found} vs "
                f"{expected}); the base is corrupted"
            )


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
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads the same model (after
    ``import alphatune``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected a quantized base)")
    if not BASE_MARKER.found_in(directory):
        raise not_a_base(directory)
    config_path = directory / BASE_CONFIG
    raw = read_json(config_path)
    qconfig = raw["quantization_config"]
    check_base_format(qconfig, config_path)  # first: a newer format may seal files differently
    record = verify_document(config_path, raw, BASE_RECORD)
    layers, head, embedding = check_quantization_config(qconfig, config_path)
    tensors = read_safetensors(directory / BASE_WEIGHTS)
    verify_tensors(directory / BASE_WEIGHTS, tensors, record)
    verify_files(directory, record)
    tokenizer = _load_tokenizer(directory, record)
    # Before the model, so that the ~30 MiB that loading a tokenizer frees again (SmolLM2's) go
    # back to the system before the weights' pages come in, not on top of them at the peak.
    release_free_memory()
    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{config_path}: not a Hugging Face model config ({err}); the base is corrupted"
        ) from err
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config
    if head is not None or embedding is not None:
        # Written untied (a shared table is tied by construction); never let tie_weights() re-tie.
        untie_word_embeddings(hf_config)
    # Parameters on the meta device: nothing is allocated or initialised for the weights the
    # file replaces (an fp32 skeleton would cost the whole fp32 model's memory, and its RSS stays
    # after the quantized layers replace it). Buffers stay real: the non-persistent ones (rotary
    # frequencies) are computed here and are not in the file.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    install_layers(model, layers, head, config_path, embedding)
    _load_into(model, tensors, qconfig.get("tied", {}), directory / BASE_WEIGHTS)
    model.eval()
    check_fingerprints(model, qconfig, directory / BASE_WEIGHTS)
    # What from_pretrained gives a base: save_pretrained writes it back (imported here, not at
    # the top: the transformers integration is built on this module).
    from alphatune.hf import attach_quantizer

    attach_quantizer(model, bcq_config(qconfig))
    release_free_memory()  # the layers' conversions, freed
    return model, tokenizer


def check_stored_tensors(
    expected: dict[str, tuple[int, ...]],
    stored: dict[str, tuple[int, ...]],
    tied: dict[str, str],
    where: Path,
) -> None:
    """Raise unless the file's tensors (name -> shape) are exactly the model's, tied names stored
    once (``tied``: name -> the name it is stored under), each in the model's shape."""
    missing = [n for n in expected if n not in stored and n not in tied]
    unexpected = [n for n in stored if n not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: tensors do not match the model; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        found = stored[tied.get(name, name)]
        if found != shape:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {found}, the model expects {shape}"
            )


def _load_into(
    model: nn.Module, tensors: dict[str, Tensor], tied: dict[str, str], where: Path
) -> None:
    state = model.state_dict(keep_vars=True)
    check_stored_tensors(
        {n: tuple(t.shape) for n, t in state.items()},
        {n: tuple(t.shape) for n, t in tensors.items()},
        tied,
        where,
    )
    loaded: dict[str, Tensor] = {}
    converted: dict[int, Tensor] = {}  # id of a file tensor -> it in the model's dtype
    for name, target in state.items():
        source = tensors[tied.get(name, name)]
        # Tied names get the very same tensor, so they stay tied after assignment.
        if id(source) not in converted:
            converted[id(source)] = source.to(target.dtype)
            if converted[id(source)] is not source:
                # Read once (hashed, converted) and dead from now on: out before the table
                # settles below, which is when loading holds the most (~6 MiB of fp16 scales).
                page_out(source)
        loaded[name] = converted[id(source)]
    # assign: the model takes the loaded tensors (its parameters may be on the meta device).
    model.load_state_dict(loaded, strict=True, assign=True)
    model.tie_weights()
    _page_out_unheld(model, tensors)


def _page_out_unheld(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Page out the file's tensors that the model does not hold as they are: those converted to
    another dtype (fp16 scales, already paged out as they were converted), and the planes a table
    turned into its byte form (already paged out chunk by chunk as it settled). Advising them
    again is one cheap call, and covers any other tensor the model did not take. Their pages in
    the mapped file were read once (hashed, converted) and are dead from now on."""
    held = {t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    for source in tensors.values():
        if source.data_ptr() not in held:
            page_out(source)
