"""``Model``: a saved alphatune base, read straight from its files and decoded without torch.

``Model.load(directory)`` reads ``config.json`` and ``model.safetensors`` (every tensor and file
checked against the hashes recorded at save, as ``alphatune.load_quantized`` checks them), lays
the blocks out for this CPU's LUT kernel (``weights.WeightsBuilder``, one layer's stored arrays
at a time) and keeps the embedding and the head in their stored compact form (8-bit level bytes,
``table``). ``generate`` runs ``alphatune_runtime.generate`` on it: the same numba step, loop and
sampling as ``alphatune.engine``, so a base gives the same tokens through either.

What it serves: Llama-family and Gemma-3 bases (``forms``; rotary ``default`` or ``linear``;
Gemma-3 as saved by transformers 5) quantized by alphatune, with a compact or float32/float16
embedding and a compact, float32/float16 or tied head: the defaults of ``alphatune quantize``;
with one adapter (``adapter=``: α₁, and whatever else it tuned of the blocks' projections: the
other planes, offsets, biases, α₁ multipliers).
Anything else (a bf16 or BCQ head, mixed-adapter batches, another architecture) raises
``UnsupportedModelError`` saying what, and ``alphatune.load_quantized`` +
``alphatune.evaluate.generate`` serve it instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alphatune_runtime import dense_prefill, dispatch, native, table
from alphatune_runtime.cache import KVCache
from alphatune_runtime.errors import CheckpointError, ConfigError, UnsupportedModelError
from alphatune_runtime.files import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_RECORD,
    ADAPTER_WEIGHTS,
    BASE_CONFIG,
    BASE_RECORD,
    BASE_WEIGHTS,
    NEWEST_BASE_FORMAT,
    OWN_HEAD_TABLE,
    QUANT_METHOD,
    QUANT_METHOD_ALIASES,
    array_digest,
    check_digest,
    check_format_version,
    digest_text,
    expected_digests,
    read_json,
    running_digest,
    verify_document,
    verify_files,
)
from alphatune_runtime.forms import (
    GEMMA3_TYPES,
    LLAMA_BLOCK,
    QK_NORM_MODULES,
    SERVED_TYPES,
    Rotary,
    embedding_scale,
    gemma3_form,
)
from alphatune_runtime.generate import Finished, cut_at_stop, generate_ids
from alphatune_runtime.memory import page_out_compiler, release_free_memory
from alphatune_runtime.sampling import Sampling
from alphatune_runtime.stack import BlockStack, Shape
from alphatune_runtime.weights import Projection, WeightsBuilder

STATIC_ROPE = ("default", "linear")  # rotary types whose frequencies the runtime computes
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


# safetensors dtype names -> numpy (bfloat16 has none: such a tensor is refused by name).
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16,
    "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


class _Tensors:
    """The tensors of a base's safetensors file, read one at a time as numpy arrays, each checked
    against its recorded hash when read (``finish`` checks the ones never read).

    Read with plain file reads at the offsets of the file's header (the safetensors layout: an
    8-byte header length, a JSON header, the data), not through a memory map as the
    ``safetensors`` library reads them for numpy: a mapped file's pages count as this process's
    memory once read, so the whole file would stay resident next to what is made of it.
    """

    def __init__(self, path: Path, record: dict | None) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        self.path, self.read = path, set()
        self.handle = path.open("rb")
        size = path.stat().st_size
        try:
            length = int.from_bytes(self.handle.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError(f"header length {length} in a file of {size} bytes")
            header = json.loads(self.handle.read(length))
            header.pop("__metadata__", None)
            self.entries = {name: self._entry(name, info, size - 8 - length)
                            for name, info in header.items()}  # fmt: skip
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            self.handle.close()
            raise CheckpointError(f"{path} cannot be read ({err}); truncated or corrupted") from err
        self.data_start = 8 + length
        self.names = list(self.entries)
        # Names first: a missing or unexpected tensor is reported before anything is hashed.
        self.expected = None if record is None else expected_digests(path, self.names, record)
        self.algorithm = None if record is None else record["algorithm"]

    @staticmethod
    def _entry(name: str, info: dict[str, Any], data_size: int) -> tuple[str, tuple, int, int]:
        dtype, shape = info["dtype"], tuple(int(n) for n in info["shape"])
        begin, end = (int(n) for n in info["data_offsets"])
        width = np.dtype(_DTYPES[dtype]).itemsize if dtype in _DTYPES else None
        if not 0 <= begin <= end <= data_size or (
            width is not None and end - begin != width * int(np.prod(shape))
        ):
            raise ValueError(f"tensor {name!r} has offsets {begin}..{end} that do not fit")
        return dtype, shape, begin, end

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, int, int]:
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing; the base is corrupted")
        return self.entries[name][1]  # type: ignore[return-value]

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name``, checked against its hash; ``CheckpointError`` if it is absent."""
        dtype, shape, begin, end = self._located(name)
        array = self._read(name, _DTYPES[dtype], begin, end - begin).reshape(shape)
        if self.expected is not None:
            found = array_digest(array, self.algorithm)  # type: ignore[arg-type]
            check_digest(self.path, name, found, self.expected[name])
        self.read.add(name)
        return array

    def slices(self, name: str) -> Iterator[np.ndarray]:
        """The tensor ``name`` one index of its first axis at a time (a plane of packed codes),
        each read when it is asked for: what is made of a big tensor can be built without the
        whole of it in memory. Its hash is checked after the last slice (``CheckpointError``),
        so a caller must take them all before using what it built."""
        dtype, shape, begin, end = self._located(name)
        numpy_dtype = np.dtype(_DTYPES[dtype])
        digest = None
        if self.expected is not None:
            digest = running_digest(f"torch.{numpy_dtype.name}", shape, self.algorithm)
        size = (end - begin) // max(shape[0], 1)
        for index in range(shape[0]):
            part = self._read(name, numpy_dtype, begin + index * size, size)
            if digest is not None:
                digest.update(memoryview(part.view(np.uint8)))
            yield part.reshape(shape[1:])
        if digest is not None:
            check_digest(self.path, name, digest_text(digest), self.expected[name])
        self.read.add(name)

    def _located(self, name: str) -> tuple[str, tuple, int, int]:
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing; the base is corrupted")
        dtype, shape, begin, end = self.entries[name]
        if dtype not in _DTYPES:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name!r} is {dtype}, which numpy cannot hold; load this "
                "base with alphatune.load_quantized"
            )
        return dtype, shape, begin, end

    def _read(self, name: str, dtype: Any, begin: int, size: int) -> np.ndarray:
        """``size`` bytes of the data section from ``begin``, as a flat array of ``dtype``."""
        self.handle.seek(self.data_start + begin)
        array = np.fromfile(self.handle, dtype, size // np.dtype(dtype).itemsize)
        if array.nbytes != size:
            raise CheckpointError(f"{self.path}: tensor {name!r} is cut short; truncated file")
        return array

    def finish(self) -> None:
        """Check every tensor of the file that was never read, and close it."""
        for name in [name for name in self.names if name not in self.read]:
            self.get(name)

    def close(self) -> None:
        self.handle.close()


@dataclass
class _Table:
    """A compact (8-bit, uniform) table: rows ``step·level + low`` per group (``table``)."""

    levels: np.ndarray  # (rows, dim) uint8
    step: np.ndarray  # (rows, G) float32
    low: np.ndarray  # (rows, G) float32
    group_size: int


@dataclass
class _Matrix:
    """A dense ``(rows, dim)`` float32 matrix (an uncompressed embedding or head)."""

    weight: np.ndarray


def _float32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, np.float32)


def _read_table(tensors: _Tensors, prefix: str, spec: dict[str, Any], where: Path) -> _Table:
    """The compact table stored under ``prefix`` (``packed_codes``, ``alpha``, ``offset``)."""
    alpha, offset = tensors.get(f"{prefix}.alpha"), tensors.get(f"{prefix}.offset")
    uniform = table.uniform_form(_float32(alpha), _float32(offset))
    if uniform is None:
        raise UnsupportedModelError(
            f"{where}: the table {prefix!r} is not in the uniform 8-bit form the runtime reads; "
            "load this base with alphatune.load_quantized"
        )
    # Plane by plane into the level bytes: Gemma-3's 262k-row table is 160 MiB of planes, which
    # read whole would sit beside its 160 MiB of bytes at the load's peak.
    name = f"{prefix}.packed_codes"
    planes, rows, width = tensors.shape(name)
    dim = int(spec["dim"])
    if (rows, dim) != (spec["rows"], spec["dim"]) or width != -(-dim // 8):
        raise CheckpointError(
            f"{where}: table {prefix!r} has planes of shape {(planes, rows, width)}, not {spec}"
        )
    levels = table.levels_from_plane_slices(tensors.slices(name), planes, rows, dim)
    return _Table(levels, *uniform, group_size=int(spec["group_size"]))


def _rotary(parameters: dict[str, Any], config: dict[str, Any], head_dim: int) -> Rotary:
    """The rotary frequencies ``(head_dim / 2,)`` float32 of rope ``parameters`` (a layer
    kind's, for Gemma-3), as transformers' default or linear rope makes them, and the attention
    scaling (1 for both). ``UnsupportedModelError`` (without the file: the caller names it)."""
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in STATIC_ROPE:
        raise UnsupportedModelError(
            f"rotary type {rope_type!r} (the runtime has {', '.join(STATIC_ROPE)})"
        )
    theta = float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = (inv_freq / np.float32(parameters["factor"])).astype(np.float32)
    return inv_freq, 1.0


def _shape(config: dict[str, Any], where: Path) -> Shape:
    model_type = config.get("model_type")
    if model_type not in SERVED_TYPES:
        raise UnsupportedModelError(
            f"{where}: the runtime serves the Llama family and Gemma-3 "
            f"({', '.join(SERVED_TYPES)}), this model is {model_type!r}"
        )
    hidden, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = int(config.get("head_dim") or hidden // n_heads)
    n_layers = int(config["num_hidden_layers"])
    if n_heads % n_kv or head_dim % 2:
        raise UnsupportedModelError(f"{where}: {n_heads} heads over {n_kv} of size {head_dim}")
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    try:
        if model_type in GEMMA3_TYPES:
            form, (inv_freq, scaling) = gemma3_form(
                config,
                n_layers,
                lambda kind: _rotary(_kind_rope(parameters, kind), config, head_dim),
            )
        else:
            if config.get("hidden_act") != "silu":
                raise UnsupportedModelError(f"MLP activation {config.get('hidden_act')!r}")
            form = LLAMA_BLOCK
            inv_freq, scaling = _rotary(parameters, config, head_dim)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{where}: {err}") from None
    return Shape(
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        eps=float(config["rms_norm_eps"]),
        inv_freq=inv_freq,
        rope_scaling=scaling,
        max_positions=int(config.get("max_position_embeddings") or 0),
        block=form,
    )


def _kind_rope(parameters: dict[str, Any], kind: str) -> dict[str, Any]:
    """Gemma-3's rope parameters of layer ``kind``, as transformers 5 saves them (one entry per
    kind). transformers 4.x saved ``rope_theta`` / ``rope_local_base_freq`` instead: such a
    base is refused rather than read with the wrong base frequency."""
    found = parameters.get(kind)
    if not isinstance(found, dict) or "rope_theta" not in found:
        raise UnsupportedModelError(
            f"no rope_parameters[{kind!r}] with a rope_theta (a Gemma-3 config from transformers "
            "4.x?); load this base with alphatune.load_quantized"
        )
    return found


def _shapes(spec: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The shapes a projection's scale tensors may have, by name (``spec``: its layer spec);
    an offset or bias only where the layer has one."""
    out, groups = int(spec["out_features"]), int(spec["in_features"]) // int(spec["group_size"])
    shapes = {
        "alpha1": ((out, groups),),
        "alpha_rest": ((int(spec["bits"]) - 1, out, groups),),
        "alpha1_scale": ((out, 1), (out, groups)),  # a multiplier per row, or per (row, group)
    }
    if spec["offset"]:
        shapes["offset"] = ((out, groups),)
    if spec["bias"]:
        shapes["bias"] = ((out,),)
    return shapes


def _projection(
    tensors: _Tensors, name: str, spec: dict[str, Any], adapter: dict[str, np.ndarray],
    where: Path,
) -> Projection:  # fmt: skip
    """A projection's arrays: the base's, with the adapter's where it has them (its shapes were
    checked by ``_read_adapter``)."""
    shapes = _shapes(spec)

    def read(what: str) -> np.ndarray:
        key = f"{name}.{what}"
        value = adapter[key] if key in adapter else tensors.get(key)  # missing: CheckpointError
        if value.shape not in shapes[what]:
            raise CheckpointError(
                f"{where}: {key} has shape {value.shape}, expected {' or '.join(map(str, shapes[what]))}"
            )
        return _float32(value)

    first = read("alpha1")
    if f"{name}.alpha1_scale" in tensors or f"{name}.alpha1_scale" in adapter:
        first = first * read("alpha1_scale")  # BCQLinear.effective_alpha1, in float32
    return Projection(
        packed=tensors.get(f"{name}.packed_codes"),
        in_features=int(spec["in_features"]),
        group_size=int(spec["group_size"]),
        first_sets=np.ascontiguousarray(first[None]),
        rest=read("alpha_rest"),
        offset=read("offset") if spec["offset"] else None,
        bias=read("bias") if spec["bias"] else None,
    )


def _read_adapter(
    directory: Path, fingerprint: str | None, layers: dict[str, dict[str, Any]]
) -> dict[str, np.ndarray]:
    """An adapter's tensors, checked as ``alphatune.load_adapter`` checks them: its config's own
    hash and format, the base it was tuned on (by the fingerprint the base's config records),
    every tensor's hash, names the base has, no NaN or infinity."""
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected an adapter)")
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {ADAPTER_CONFIG}: it is not an alphatune adapter (a base goes "
            "first, an adapter with adapter=)"
        )
    config = read_json(path)
    if config.get("format", ADAPTER_FORMAT) != ADAPTER_FORMAT:
        raise CheckpointError(f"{path}: format {config.get('format')!r} is not an adapter's")
    check_format_version(config, ADAPTER_FORMAT_VERSION, path)
    record = verify_document(path, config, ADAPTER_RECORD)
    if config.get("base_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path}: adapter was tuned on base {config.get('base_fingerprint')}, this base is "
            f"{fingerprint}; load the base it was tuned on"
        )
    tensors = _Tensors(directory / ADAPTER_WEIGHTS, record)
    try:
        arrays = {name: tensors.get(name) for name in tensors.names}
    finally:
        tensors.close()
    for name, array in arrays.items():
        layer, _, what = name.rpartition(".")
        shapes = _shapes(layers[layer]) if layer in layers else {}
        if what not in shapes:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: tensor {name!r} has no place in this base (the "
                "runtime serves adapters of the blocks' projections)"
            )
        if array.shape not in shapes[what]:
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: {name!r} has shape {array.shape}, the base "
                f"expects {' or '.join(map(str, shapes[what]))}"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise CheckpointError(
                f"{directory / ADAPTER_WEIGHTS}: {name} holds NaN or infinity; the adapter is "
                "unusable (its training diverged)"
            )
    return arrays


def _block_names(shape: Shape) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(shape.n_layers) for p in native.PROJECTIONS]


def _blocks(
    tensors: _Tensors, layers: dict[str, Any], shape: Shape, kernel: dispatch.NativeKernel,
    adapter: dict[str, np.ndarray], where: Path,
) -> BlockStack:  # fmt: skip
    names = _block_names(shape)
    missing = [name for name in names if name not in layers]
    if missing:
        raise UnsupportedModelError(
            f"{where}: {missing[0]} is not quantized; the runtime decodes quantized blocks only"
        )
    builder = WeightsBuilder(
        kernel,
        [tensors.shape(f"{name}.packed_codes") for name in names],  # type: ignore[misc]
        [int(layers[name]["out_features"]) if layers[name]["bias"] else 0 for name in names],
    )
    for name in names:  # one layer's stored arrays at a time
        builder.add(_projection(tensors, name, layers[name], adapter, where))
    form = shape.block

    def norm_weight(name: str) -> np.ndarray:  # what the step multiplies by (forms.BlockForm)
        return _float32(tensors.get(f"{name}.weight")) + np.float32(form.norm_offset)

    def block_norms(modules: tuple[str, ...]) -> np.ndarray:
        return np.stack(
            [
                np.stack([norm_weight(f"model.layers.{i}.{module}") for module in modules])
                for i in range(shape.n_layers)
            ]
        )

    weights = builder.finish(
        block_norms(form.norm_modules),
        norm_weight("model.norm"),
        block_norms(QK_NORM_MODULES) if form.qk_norm else None,
    )
    return BlockStack.of(shape, weights, kernel)


def _embedding(
    tensors: _Tensors, config: dict[str, Any], qconfig: dict[str, Any], where: Path
) -> tuple[_Table | _Matrix, str, float]:
    """The input embedding, the module it was, and the scale its rows take (a float embedding's:
    the model's, ``forms.embedding_scale``)."""
    record = qconfig.get("input_embedding")
    if record is None:
        module = "model.embed_tokens"
        weight = _float32(tensors.get(f"{module}.weight"))
        return _Matrix(weight), module, embedding_scale(config)
    module = record["module"]
    return _read_table(tensors, module, record["table"], where), module, float(record["scale"])


def _head(
    tensors: _Tensors,
    config: dict[str, Any],
    qconfig: dict[str, Any],
    embedding: tuple[_Table | _Matrix, str, float],
    where: Path,
) -> tuple[_Table | _Matrix, np.ndarray | None]:
    """The LM head's matrix (shared with the embedding where it was tied) and its bias."""
    head = qconfig.get("head")
    if head is None:
        if "lm_head.weight" in tensors:
            return _Matrix(_float32(tensors.get("lm_head.weight"))), None
        # transformers' LlamaConfig default is untied.
        if config.get("tie_word_embeddings", False) and isinstance(embedding[0], _Matrix):
            return embedding[0], None
        raise UnsupportedModelError(f"{where}: no LM head weight and no tied embedding")
    if head.get("mode") != "compact":
        raise UnsupportedModelError(
            f"{where}: the LM head is stored {head.get('mode')!r}; the runtime reads compact and "
            "float heads (load this base with alphatune.load_quantized)"
        )
    module = head["module"]
    bias = _float32(tensors.get(f"{module}.bias")) if head.get("bias") else None
    if head.get("shares") is not None:
        if head["shares"] != embedding[1] or not isinstance(embedding[0], _Table):
            raise CheckpointError(
                f"{where}: the head shares {head['shares']!r}, which is not the compact embedding"
            )
        return embedding[0], bias
    return _read_table(tensors, f"{module}.{OWN_HEAD_TABLE}", head["table"], where), bias


def _base_config(directory: Path) -> tuple[dict[str, Any], dict | None]:
    """A base's ``config.json`` and its integrity record: its own hash and the tokenizer files
    it lists checked, its format one this version reads."""
    config_path = directory / BASE_CONFIG
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected a quantized base)")
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} has no {BASE_CONFIG}: it is not a quantized base; create one with "
            "'alphatune quantize'"
        )
    config = read_json(config_path)
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") not in (
        QUANT_METHOD, *QUANT_METHOD_ALIASES,
    ):  # fmt: skip
        raise CheckpointError(
            f"{config_path} has no alphatune quantization_config; create a base with "
            "'alphatune quantize' first"
        )
    check_format_version(qconfig, NEWEST_BASE_FORMAT, config_path, "base format_version")
    record = verify_document(config_path, config, BASE_RECORD)
    verify_files(directory, record)
    return config, record


class Tokenizer:
    """The base's ``tokenizer.json`` through the ``tokenizers`` library (no transformers)."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_file(str(directory / TOKENIZER_FILE))
        settings = directory / TOKENIZER_CONFIG
        eos = read_json(settings).get("eos_token") if settings.is_file() else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_id = None if eos is None else self.backend.token_to_id(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)


@dataclass
class Model:
    """A saved base converted for the native step, with its embedding, head and tokenizer."""

    stack: BlockStack
    embedding: _Table | _Matrix
    embedding_scale: float
    head: _Table | _Matrix
    head_bias: np.ndarray | None
    tokenizer: Tokenizer | None
    eos_ids: tuple[int, ...]
    thread_count: int

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        adapter: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> Model:
        """Read the base in ``directory`` (saved by ``alphatune quantize`` / ``save_quantized``).

        ``adapter``: an adapter directory (``alphatune tune`` / ``save_adapter``) tuned on this
        base; its scales replace the base's, as ``alphatune.load_adapter`` does. ``threads``:
        numba threads for decode (default: numba's pool). ``CheckpointError`` names a missing or
        corrupted file or tensor, or an adapter of another base; ``UnsupportedModelError`` says
        what the runtime does not serve (see the module docstring).
        """
        directory = Path(directory)
        config_path = directory / BASE_CONFIG
        config, record = _base_config(directory)
        qconfig = config["quantization_config"]
        kernel = dispatch.required_kernel()
        layers = qconfig.get("layers")
        if not isinstance(layers, dict):
            raise CheckpointError(f"{config_path}: quantization_config has no 'layers'")
        shape = _shape(config, config_path)
        adapted = (
            {}
            if adapter is None
            else _read_adapter(
                Path(adapter),
                qconfig.get("fingerprint"),
                {name: layers[name] for name in _block_names(shape) if name in layers},
            )
        )
        # As load_quantized: a base with a hash record has the tokenizer files it lists (each
        # verified above); one without says nothing, so whatever is there is used.
        listed = record is None or TOKENIZER_FILE in record.get("files", {})
        has_tokenizer = listed and (directory / TOKENIZER_FILE).is_file()
        tokenizer = Tokenizer(directory) if has_tokenizer else None
        # Before the weights, and what parsing it freed given back at once: Gemma-3's 262k-token
        # tokenizer.json takes ~290 MiB to load and keeps ~100, so loaded after the weights its
        # parsing would sit on top of them at the peak (load_quantized does the same).
        release_free_memory()
        tensors = _Tensors(directory / BASE_WEIGHTS, record)
        try:
            embedding = _embedding(tensors, config, qconfig, config_path)
            head, bias = _head(tensors, config, qconfig, embedding, config_path)
            stack = _blocks(tensors, layers, shape, kernel, adapted, config_path)
            tensors.finish()
        finally:
            tensors.close()
        eos = config.get("eos_token_id")
        eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos_ids.add(tokenizer.eos_id)
        from numba import config as numba_config

        pool = int(numba_config.NUMBA_NUM_THREADS)
        model = cls(
            stack=stack,
            embedding=embedding[0],
            embedding_scale=embedding[2],
            head=head,
            head_bias=bias,
            tokenizer=tokenizer,
            eos_ids=tuple(sorted(eos_ids)),
            thread_count=max(1, min(threads or pool, pool)),
        )
        # Load the step's compiled code now; then give back what loading freed (the stored
        # arrays) and numba's compiler, which decode never runs (as alphatune.engine does).
        model.stack.load_step()
        release_free_memory()
        page_out_compiler()
        return model

    # ------------------------------------------------------------ the Decoder protocol
    def threads(self) -> int:
        return self.thread_count

    def forward(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        positions: np.ndarray,
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int | None = None,
    ) -> np.ndarray:
        from numba import set_num_threads

        threads = self.thread_count if threads is None else threads
        set_num_threads(threads)
        return self.stack.run(self.embed(ids), rows, positions, sets, cache, rotary, threads)

    def prefill_prompts(
        self,
        prompts: Sequence[np.ndarray],
        sets: np.ndarray,
        cache: KVCache,
        rotary: tuple[np.ndarray, np.ndarray],
        threads: int,
    ) -> np.ndarray | None:
        """The final-normed hidden states ``(P, H)`` of the prompts' last tokens (prompt p in
        cache row p, adapter ``sets[p]``) through float32 GEMMs (``dense_prefill``: numpy's
        BLAS), or None where the LUT kernel is faster for these prompts (fewer than
        ``dense_prefill.MIN_NUMPY_TOKENS`` tokens per adapter scale set); the caller then runs
        them through ``forward``."""
        batch = dense_prefill.batch_of(prompts, sets, self.stack.weights.banked)
        tokens = dense_prefill.tokens_per_scale_set(batch)
        if not dense_prefill.takes_dense_path(tokens, dense_prefill.MIN_NUMPY_TOKENS):
            return None
        from numba import set_num_threads

        dense, ops = dense_prefill.DensePrefill(self.stack), dense_prefill.NumpyOps()
        try:
            return dense_prefill.run_in_passes(
                lambda hidden, part: dense.run(hidden, part, cache, rotary, threads, ops),
                self.embed, prompts, batch, dense_prefill.MAX_PASS_TOKENS,
            )  # fmt: skip
        finally:
            # The head's numba kernel (logits of the last tokens) runs on the count set now.
            set_num_threads(threads)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """``(N, H)`` float32 embeddings of ``ids`` (a writable C array: the residual stream)."""
        ids = np.asarray(ids, np.int64)
        vocab = self.vocab_size
        if ids.size and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            raise ConfigError(f"token ids out of range: expected 0..{vocab - 1}")
        if isinstance(self.embedding, _Table):
            e = self.embedding
            rows = table.table_rows(e.levels, e.step, e.low, ids, e.group_size)
        else:
            rows = self.embedding.weight[ids].copy()
        if self.embedding_scale != 1.0:
            rows *= np.float32(self.embedding_scale)
        return rows

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """``(N, V)`` float32 logits of final-normed hidden states ``(N, H)``."""
        if isinstance(self.head, _Table):
            h = self.head
            out = table.table_matmul(hidden, h.levels, h.step, h.low, h.group_size)
        else:
            out = _float32(hidden) @ self.head.weight.T
        return out if self.head_bias is None else out + self.head_bias

    @property
    def vocab_size(self) -> int:
        e = self.embedding
        return (e.levels if isinstance(e, _Table) else e.weight).shape[0]

    # ------------------------------------------------------------ text in, text out
    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (),
    ) -> list[str]:
        """One answer per prompt (text, or token ids): the new tokens decoded, cut before the
        first ``stop`` string. Needs the base's tokenizer (``generate_ids`` works on ids alone)."""
        if isinstance(stop, str):
            raise ConfigError(f"stop must be a list of strings, got the string {stop!r}")
        tokenizer = self._tokenizer()
        encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for index, ids in enumerate(encoded):
            if not ids:
                raise ConfigError(f"prompt {index} is empty after tokenization; give it some text")
        finished: list[Finished] = generate_ids(
            self,
            encoded,
            max_new_tokens=max_new_tokens,
            eos_ids=self.eos_ids,
            sampling=sampling,
            decode=tokenizer.decode,
            stop=(lambda text: any(s in text for s in stop)) if stop else None,
        )
        texts = [tokenizer.decode(done.tokens) for done in finished]
        return [cut_at_stop(text, stop) for text in texts]

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ConfigError("this base was saved without a tokenizer; pass token ids")
        return self.tokenizer
