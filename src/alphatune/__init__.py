"""alphatune: binary-coding quantization of language models and scale-only (AlphaTuning) adaptation.

Public API::

    from alphatune import BCQConfig, AlphaTuningConfig, quantize_, prepare_for_alphatuning
    summary = quantize_(model, BCQConfig(bits=3), calibration=token_ids)
    report = prepare_for_alphatuning(model, AlphaTuningConfig())
"""

from alphatune.config import (
    AlphaTuningConfig,
    BCQConfig,
    LMHeadMode,
    PackingFormat,
    QuantMethod,
    TrainableScales,
    TrainConfig,
)
from alphatune.errors import (
    AlphaTuneError,
    CheckpointError,
    ConfigError,
    DataError,
    KernelUnavailableError,
    UnsupportedModelError,
)
from alphatune.layers import BCQLinear
from alphatune.lm_head import quantize_lm_head
from alphatune.quantize import QuantizationSummary, quantize_
from alphatune.tuning import TrainableReport, prepare_for_alphatuning

__version__ = "0.1.0"

__all__ = [
    "AlphaTuneError",
    "AlphaTuningConfig",
    "BCQConfig",
    "BCQLinear",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "KernelUnavailableError",
    "LMHeadMode",
    "PackingFormat",
    "QuantMethod",
    "QuantizationSummary",
    "TrainConfig",
    "TrainableReport",
    "TrainableScales",
    "UnsupportedModelError",
    "__version__",
    "prepare_for_alphatuning",
    "quantize_",
    "quantize_lm_head",
]
