"""transformers integration: ``from_pretrained`` and ``save_pretrained`` read and write BCQ bases.

Registered with transformers' public API (``register_quantization_config``,
``register_quantizer``) when ``alphatune`` is imported, under ``"alphatune_bcq"`` (what a base's
``config.json`` says) and ``"bcq"`` (read as the same; skipped if another package took the name):

- ``AutoModelForCausalLM.from_pretrained(base_dir)`` builds the model on the meta device, puts
  empty ``BCQLinear`` layers (and a replaced LM head, and a compact embedding table) where the
  base's specs say, and
  transformers fills them from ``model.safetensors``: packed codes, never an fp32 copy of a
  quantized layer. Before that, everything ``load_quantized`` checks is checked (format version,
  the hash of ``config.json``, of every tensor and tokenizer file, layer specs, tensor names and
  shapes), and the codes' fingerprints after; the logits are ``load_quantized``'s.
- ``from_pretrained(fp_dir, quantization_config=BCQConfig(method="offset", ...))`` quantizes while
  loading: each target layer is fitted as its weight arrives and replaced, so peak memory stays
  near the quantized model plus one full-precision layer; the embedding and head (which arrive
  in full precision) are made compact after loading, as ``quantize_`` does. Data-free methods
  only: ``calibrated`` needs calibration text, so load in full precision, then
  ``quantize_(model, config, calibration=tokens)``; ``save_pretrained`` (or ``save_quantized``)
  writes the base.
- ``model.save_pretrained(dir)`` of such a model writes the packed format with its integrity
  record; ``load_quantized`` and ``from_pretrained`` both read it. (It writes no tokenizer; save
  one with ``tokenizer.save_pretrained(dir)``, or use ``save_quantized(model, dir, config,
  tokenizer)``, which records the tokenizer files' hashes too.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from alphatune.bases import (
    bcq_config,
    check_base_format,
    check_fingerprints,
    check_quantization_config,
    check_stored_tensors,
    install_layers,
    quantization_record,
    storage_tensors,
)
from alphatune.config import BCQConfig, EmbeddingMode, LMHeadMode, QuantMethod
from alphatune.embedding import BCQHead, BCQTable, settle_tables
from alphatune.errors import CheckpointError, ConfigError, UnsupportedModelError
from alphatune.files import (
    BASE_CONFIG,
    BASE_RECORD,
    BASE_WEIGHTS,
    QUANT_METHOD,
    QUANT_METHOD_ALIASES,
    read_json,
    seal,
    verify_document,
    verify_files,
    verify_tensors,
)
from alphatune.layers import BCQLinear, linear_weight
from alphatune.lm_head import check_lm_head, quantize_lm_head, untie_word_embeddings
from alphatune.memory import own_mapped_tensors, release_free_memory
from alphatune.quantize import _set_submodule, check_layer_bits, find_target_layers, summarize

logger = logging.getLogger(__name__)


class BCQQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a BCQ model as transformers holds it.

    ``record`` is what a base's ``config.json`` holds (``alphatune.bases.quantization_record`` and
    its integrity record); ``bcq`` the ``BCQConfig`` (read from the record when loading a base).
    ``from_pretrained(..., quantization_config=BCQConfig(...))`` is wrapped into one of these.
    """

    def __init__(self, bcq: BCQConfig | None = None, record: dict[str, Any] | None = None):
        self.quant_method = QUANT_METHOD
        self.record = dict(record) if record is not None else None
        self._bcq = bcq

    @property
    def bcq(self) -> BCQConfig:
        if self._bcq is None:
            self._bcq = bcq_config(self.record or {})
        return self._bcq

    @classmethod
    def from_dict(
        cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        config = cls(record=config_dict)  # checked when the model is built (the file is known)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        if self.record is not None:
            return dict(self.record)
        return {"quant_method": QUANT_METHOD, **self.bcq.to_dict()}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class _QuantizeOnLoad(ConversionOps):
    """Fit a target layer as its full-precision weight arrives and put a ``BCQLinear`` in its place."""

    def __init__(self, quantizer: BCQHfQuantizer) -> None:
        self.quantizer = quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str] | None = None,
        target_patterns: list[str] | None = None,
        *,
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        assert model is not None and full_layer_name is not None  # transformers passes them
        (value,) = input_dict.values()
        weight = value[0] if isinstance(value, list) else value
        name = full_layer_name.rpartition(".")[0]
        try:
            self.quantizer.quantize_layer(model, name, weight)
        except Exception as err:  # transformers logs and skips; postprocess raises it
            self.quantizer.errors[name] = err
            raise
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


class BCQHfQuantizer(HfQuantizer):
    """Loads BCQ bases (``pre_quantized``) and quantizes full-precision models while loading."""

    requires_calibration = False
    quantization_config: BCQQuantizationConfig

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        if isinstance(quantization_config, BCQConfig):
            quantization_config = BCQQuantizationConfig(bcq=quantization_config)
        super().__init__(quantization_config, **kwargs)
        self.targets: dict[str, str] = {}  # weight name -> layer name (quantize on load)
        self.errors: dict[str, BaseException] = {}
        self.config_path: Path | None = None  # the base's config.json (pre-quantized)

    # ------------------------------------------------------------ checks before anything loads
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.bcq.method == QuantMethod.CALIBRATED:
            raise ConfigError(
                "method 'calibrated' needs calibration text, which from_pretrained cannot take: "
                "load the model in full precision, then quantize_(model, config, "
                "calibration=token_ids) and save_pretrained (or save_quantized); or pass a "
                "data-free method, BCQConfig(method='offset')"
            )
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ConfigError("BCQ models cannot be offloaded to disk; drop 'disk' from device_map")

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in (None, torch.float32):
            logger.info("BCQ models run in float32 (scales and unquantized tensors); got %s", dtype)
        return torch.float32

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return not self.pre_quantized and param_name in self.targets

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    # ------------------------------------------------------------ before the weights load
    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        if self.pre_quantized:
            self._prepare_base(model, checkpoint_files)
        else:
            self._prepare_targets(model)
        return model

    def _prepare_base(self, model: nn.Module, checkpoint_files: list[str] | None) -> None:
        """Check the base like ``load_quantized`` does and put its empty layers in place."""
        files = [Path(f) for f in checkpoint_files or []]
        if len(files) != 1 or files[0].name != BASE_WEIGHTS:
            raise CheckpointError(
                f"a BCQ base is one {BASE_WEIGHTS} next to its {BASE_CONFIG}; found "
                f"{[f.name for f in files]}"
            )
        directory, weights = files[0].parent, files[0]
        self.config_path = directory / BASE_CONFIG
        raw = read_json(self.config_path)
        qconfig = raw.get("quantization_config")
        if not isinstance(qconfig, dict):
            raise CheckpointError(f"{self.config_path} has no quantization_config")
        check_base_format(qconfig, self.config_path)
        record = verify_document(self.config_path, raw, BASE_RECORD)
        layers, head, embedding = check_quantization_config(qconfig, self.config_path)
        verify_files(directory, record)
        self.quantization_config = BCQQuantizationConfig(record=qconfig)
        if head is not None or embedding is not None:
            untie_word_embeddings(model)  # written untied; never let tie_weights() re-tie it
        install_layers(model, layers, head, self.config_path, embedding)
        tied = qconfig.get("tied", {})
        # On the CPU: transformers builds the model under a meta-device context.
        with torch.device("cpu"), _open(weights) as tensors:
            check_stored_tensors(
                {name: tuple(t.shape) for name, t in model.state_dict().items()},
                {name: tensors.shape(name) for name in tensors},
                tied,
                weights,
            )
            verify_tensors(weights, tensors, record)
        for module in model.modules():
            if isinstance(module, (BCQLinear, BCQTable, BCQHead)):
                module._is_hf_initialized = True  # every tensor comes from the file (checked)

    def _prepare_targets(self, model: nn.Module) -> None:
        """Choose the layers to quantize and check the config fits them, before any weight loads."""
        config = self.quantization_config.bcq
        layers = find_target_layers(model, config)
        if not layers:
            raise UnsupportedModelError(
                f"no linear layers to quantize in {type(model).__name__} (include="
                f"{config.include}, exclude={config.exclude}); pass include patterns"
            )
        for module in layers.values():
            config.group_size_for(linear_weight(module)[0].shape[1])  # raises if none fits
        check_layer_bits(config, layers)
        check_lm_head(model, config)
        self.targets = {f"{name}.weight": name for name in layers}

    def quantize_layer(self, model: nn.Module, name: str, weight: Tensor) -> None:
        """Replace the layer ``name`` (still on the meta device) by its BCQ fit of ``weight``."""
        module = model.get_submodule(name)
        module.weight = nn.Parameter(weight, requires_grad=False)  # only this layer in full
        if module.bias is not None and module.bias.is_meta:
            # The bias arrives later; transformers loads it into the new layer's bias.
            module.bias = nn.Parameter(torch.zeros(module.bias.shape, device=weight.device))
        config = self.quantization_config.bcq
        layer = BCQLinear.from_linear(module, config, bits=config.bits_for(name))
        layer._is_hf_initialized = True
        _set_submodule(model, name, layer)
        release_free_memory()  # the full-precision layer and the fit's temporaries

    # ------------------------------------------------------------ after the weights loaded
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:
            assert self.config_path is not None  # _prepare_base
            qconfig = self.quantization_config.record or {}
            _tie(model, qconfig.get("tied", {}))
            on_meta = [n for n, t in _tensors(model).items() if t.is_meta]
            if on_meta:
                raise CheckpointError(
                    f"{self.config_path.parent / BASE_WEIGHTS}: no values for {on_meta[:5]}"
                )
            settle_tables(model)  # loaded by name, in the stored form: take the serving form
            check_fingerprints(model, qconfig, self.config_path.parent / BASE_WEIGHTS)
            release_free_memory()  # ~24 MiB of the loader's freed heap on SmolLM2's base
        else:
            left = [
                n for n in self.targets.values() if not isinstance(_module(model, n), BCQLinear)
            ]
            if left:
                first = next((self.errors[n] for n in left if n in self.errors), None)
                raise ConfigError(
                    f"{len(left)} layers were not quantized while loading ({left[:3]}): {first}"
                ) from first
            config = self.quantization_config.bcq
            if config.lm_head != LMHeadMode.KEEP or config.embedding != EmbeddingMode.KEEP:
                quantize_lm_head(model, config)
            # The norms (and any kept tensor) are views of the mapped checkpoint: copied, so
            # the whole fp32 file is no longer held.
            own_mapped_tensors(model)
            release_free_memory()
            summary = summarize(model)
            logger.info(
                "quantized %d layers while loading: %.3f bits per weight",
                summary.layers,
                summary.bits_per_weight,
            )
        model.eval()
        return model

    # ------------------------------------------------------------ save_pretrained
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Tensor], dict]:
        """The packed tensors, and ``model.config`` set up so that the ``config.json`` that
        ``save_pretrained`` writes next is the sealed document ``load_quantized`` checks."""
        tensors, aliases = storage_tensors(model)
        config = BCQQuantizationConfig(
            bcq=self.quantization_config.bcq,
            record=quantization_record(model, self.quantization_config.bcq, aliases),
        )
        self.quantization_config = config
        model.config.quantization_config = config
        # save_pretrained sets these after this call; set them first, to the same values, so the
        # document sealed here is the one it writes (config.to_json_string(use_diff=True)).
        model.config.dtype = str(model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
        document = model.config._encode_special_floats(model.config.to_diff_dict())
        config.record = seal(document, BASE_RECORD, tensors=tensors)["quantization_config"]
        return tensors, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # the scales train (AlphaTuning); the codes are buffers

    @property
    def is_qat_trainable(self) -> bool:
        return True  # transformers' Trainer may train the scales without a peft adapter


def attach_quantizer(model: nn.Module, config: BCQConfig) -> None:
    """Give a transformers model quantized by ``quantize_`` (or loaded by ``load_quantized``) what
    ``from_pretrained`` gives one: the quantizer, so that ``save_pretrained`` writes the packed
    base, and its config. Other modules are left as they are."""
    if not isinstance(model, PreTrainedModel):
        return
    quantizer = BCQHfQuantizer(config, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = quantizer.quantization_config


# ---------------------------------------------------------------- helpers
def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    return dict(model.named_parameters(remove_duplicate=False)) | dict(
        model.named_buffers(remove_duplicate=False)
    )


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make every alias of ``tied`` the very tensor it was saved as (transformers ties the usual
    embedding/head pair itself; this covers whatever else the file stored once)."""
    for alias, source in tied.items():
        tensors = _tensors(model)
        if tensors[alias] is tensors[source]:
            continue
        owner, _, attribute = alias.rpartition(".")
        setattr(model.get_submodule(owner), attribute, tensors[source])


class _LazyTensors(Mapping[str, Tensor]):
    """The tensors of an open safetensors file, each read when asked for (one at a time)."""

    def __init__(self, handle: Any, path: Path) -> None:
        self._handle, self._path = handle, path
        self._names = list(handle.keys())

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{self._path}: tensor {name!r} cannot be read ({err})") from err

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _open:
    """``with _open(path) as tensors``: a ``_LazyTensors``; an unreadable file names itself."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _LazyTensors:
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is missing")
        try:
            self._context = safe_open(str(self.path), framework="pt")
            return _LazyTensors(self._context.__enter__(), self.path)
        except (SafetensorError, OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
            raise CheckpointError(
                f"{self.path} cannot be read ({err}); it is truncated or corrupted"
            ) from err

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)


def register() -> None:
    """Register the config and quantizer with transformers (idempotent; ``import alphatune`` does)."""
    for name in (QUANT_METHOD, *QUANT_METHOD_ALIASES):
        taken = AUTO_QUANTIZER_MAPPING.get(name)
        if taken is BCQHfQuantizer:
            continue
        if taken is not None or name in AUTO_QUANTIZATION_CONFIG_MAPPING:
            logger.debug("quant_method %r is registered by another package; not taking it", name)
            continue
        register_quantization_config(name)(BCQQuantizationConfig)
        register_quantizer(name)(BCQHfQuantizer)
