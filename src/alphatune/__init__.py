"""alphatune: binary-coding quantization of language models and scale-only (AlphaTuning) adaptation.

Public API::

    from alphatune import BCQConfig, AlphaTuningConfig, quantize_, prepare_for_alphatuning
    summary = quantize_(model, BCQConfig(bits=3), calibration=token_ids)
    save_quantized(model, "base", BCQConfig(bits=3), tokenizer)
    report = prepare_for_alphatuning(model, AlphaTuningConfig())
    train(model, tokenizer, examples, TrainConfig(max_steps=100), output_dir="adapter")
    save_adapter(model, "adapter", AlphaTuningConfig())
    load_adapter(model, "adapter", adapter_name="e2e"); set_adapter(model, "e2e")

``import alphatune`` registers the BCQ quantizer with transformers (``alphatune.hf``): then
``AutoModelForCausalLM.from_pretrained(base_dir)`` loads a base, ``from_pretrained(model_dir,
quantization_config=BCQConfig(method="offset"))`` quantizes while loading, and
``model.save_pretrained(dir)`` writes a base.

Training also runs under transformers' ``Trainer`` or TRL's ``SFTTrainer`` (``AdapterCallback``
writes adapters at their checkpoints), and data-parallel under ``torchrun`` / ``accelerate
launch`` (``data_parallel``; ``alphatune tune`` joins the process group itself): docs/training.md.

The package face imports the rooms (``bases``: the quantized base's files, ``adapters``: task
adapters, ``mixed``: several adapters in one batch, ``train``, ...); none of them imports it.
"""

from alphatune.adapters import (
    active_adapter,
    adapter_names,
    delete_adapter,
    load_adapter,
    read_adapter,
    save_adapter,
    set_adapter,
    unload_adapter,
)
from alphatune.bases import base_fingerprint, load_quantized, save_quantized
from alphatune.config import (
    AlphaTuningConfig,
    BCQConfig,
    EmbeddingMode,
    LMHeadMode,
    PackingFormat,
    QuantMethod,
    TrainableScales,
    TrainConfig,
)
from alphatune.distributed import DataParallel, data_parallel
from alphatune.embedding import BCQEmbedding, BCQHead
from alphatune.errors import (
    AlphaTuneError,
    CheckpointError,
    ConfigError,
    DataError,
    KernelUnavailableError,
    UnsupportedModelError,
)
from alphatune.hf import BCQHfQuantizer, BCQQuantizationConfig
from alphatune.hf import register as _register_with_transformers
from alphatune.layers import BCQLinear
from alphatune.lm_head import quantize_lm_head
from alphatune.mixed import AdapterBank, load_adapters, unload_adapters
from alphatune.quantize import QuantizationSummary, quantize_
from alphatune.train import TrainResult, train
from alphatune.tuning import TrainableReport, prepare_for_alphatuning
from alphatune.version import __version__

# After this, transformers' from_pretrained reads BCQ bases and quantizes while loading.
_register_with_transformers()

__all__ = [
    "AdapterBank",
    "AdapterCallback",
    "AlphaTuneError",
    "AlphaTuningConfig",
    "BCQConfig",
    "BCQEmbedding",
    "BCQHead",
    "BCQHfQuantizer",
    "BCQLinear",
    "BCQQuantizationConfig",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataParallel",
    "EmbeddingMode",
    "KernelUnavailableError",
    "LMHeadMode",
    "PackingFormat",
    "QuantMethod",
    "QuantizationSummary",
    "TrainConfig",
    "TrainResult",
    "TrainableReport",
    "TrainableScales",
    "UnsupportedModelError",
    "__version__",
    "active_adapter",
    "adapter_names",
    "base_fingerprint",
    "data_parallel",
    "delete_adapter",
    "load_adapter",
    "load_adapters",
    "load_quantized",
    "prepare_for_alphatuning",
    "quantize_",
    "quantize_lm_head",
    "read_adapter",
    "save_adapter",
    "save_quantized",
    "set_adapter",
    "train",
    "unload_adapter",
    "unload_adapters",
]


def __getattr__(name: str) -> object:
    # transformers' Trainer machinery takes seconds to import: loaded when first asked for.
    if name == "AdapterCallback":
        from alphatune.hf_trainer import AdapterCallback

        return AdapterCallback
    raise AttributeError(f"module 'alphatune' has no attribute {name!r}")
