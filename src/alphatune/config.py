"""Configuration objects: how to quantize (BCQConfig), what trains (AlphaTuningConfig), how (TrainConfig).

Configs are frozen dataclasses whose enums are ``str`` enums, so they round-trip through JSON and the
command line. ``to_dict``/``from_dict`` give the JSON form; unknown keys warn instead of failing so
that files written by a newer version still load.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

from alphatune.errors import ConfigError
from alphatune.files import BASE_FORMAT, QUANT_METHOD

logger = logging.getLogger(__name__)

AUTO = "auto"


class QuantMethod(str, Enum):
    """How the binary codes and scales are fitted to a weight.

    GREEDY and ALTERNATING are the paper's methods, kept exactly as defined there. OFFSET is BCQ with
    a per-group offset, initialised from round-to-nearest uniform quantization and refined by
    alternating least squares. CALIBRATED rounds onto the OFFSET grid with GPTQ-style error feedback
    weighted by the layer's input statistics (needs calibration text).
    """

    GREEDY = "greedy"
    ALTERNATING = "alternating"
    OFFSET = "offset"
    CALIBRATED = "calibrated"

    @property
    def has_offset(self) -> bool:
        return self in (QuantMethod.OFFSET, QuantMethod.CALIBRATED)


class PackingFormat(str, Enum):
    """Layout of the packed codes on disk and in memory (see ``alphatune.packing``)."""

    BITPLANE_U8 = "bitplane_u8"


class LMHeadMode(str, Enum):
    """What happens to the LM head (output projection) for inference; see ``alphatune.lm_head``."""

    KEEP = "keep"  # unchanged (tied to the input embedding if the model ties them)
    BF16 = "bf16"  # a bfloat16 copy, untied from the embedding (which stays for lookup)
    BCQ = "bcq"  # a frozen BCQLinear of ``lm_head_bits`` bits, untied from the embedding
    # An 8-bit BCQ table (alphatune.embedding), the default; a head tied to the input embedding
    # stays tied to it (one table) when the embedding is compact too.
    COMPACT = "compact"


class EmbeddingMode(str, Enum):
    """What happens to the input (token) embedding; see ``alphatune.embedding``."""

    KEEP = "keep"  # unchanged (full precision)
    COMPACT = "compact"  # an 8-bit BCQ table, the default; rows are dequantized when looked up


class TrainableScales(str, Enum):
    """Which scale factors AlphaTuning trains."""

    ALPHA1 = "alpha1"  # the paper's default: only the first (largest) scale of each row/group
    ALL_ALPHA = "all_alpha"


class Granularity(str, Enum):
    """How many α₁ values an adapter trains per layer."""

    GROUP = "group"  # one α₁ per (row, group): as many as the quantized layer has α₁ values
    ROW = "row"  # one multiplier per output row on top of the frozen grouped α₁ (the paper's count)


class AlphaGradScale(str, Enum):
    """Factor on the scales' gradients (see ``AlphaTuningConfig.alpha_grad_scale``)."""

    NONE = "none"
    GROUP_SIZE = "group_size"  # the paper's Eq. 4: divide by the group size


T = TypeVar("T")


def _patterns(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)  # type: ignore[call-overload]
    except TypeError:
        patterns = (value,)
    if not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"module patterns must be strings, got {value!r}")
    return patterns


def _layer_bits(value: object) -> tuple[tuple[str, int], ...]:
    """``layer_bits`` as a hashable tuple of ``(pattern, bits)`` in the order given (the first
    match wins), from a mapping or ``(pattern, bits)`` pairs (the JSON form: a list of pairs)."""
    expected = "a mapping of module-name patterns to bits 1..8, e.g. {'*.down_proj': 4}"
    if isinstance(value, str):  # "*.down_proj=4" would otherwise split into characters
        raise ConfigError(f"layer_bits must be {expected}, not a string; got {value!r}")
    try:
        pairs = list(value.items()) if isinstance(value, Mapping) else list(value)  # type: ignore[call-overload]
        pairs = [tuple(pair) for pair in pairs]
    except TypeError:
        raise ConfigError(f"layer_bits must be {expected}; got {value!r}") from None
    for pair in pairs:
        ok = len(pair) == 2 and isinstance(pair[0], str)
        bits = pair[1] if len(pair) == 2 else None
        if not ok or isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ConfigError(f"layer_bits must be {expected}; got the entry {pair!r}")
    patterns = [pattern for pattern, _ in pairs]
    repeated = sorted({p for p in patterns if patterns.count(p) > 1})
    if repeated:
        raise ConfigError(f"layer_bits names {repeated} more than once; give each pattern once")
    return tuple((pattern, int(bits)) for pattern, bits in pairs)


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        logger.warning(
            "%s: ignoring unknown keys %s (written by a newer alphatune?)", where, unknown
        )
    return cls(**{k: v for k, v in data.items() if k in known})


def _check_types(
    config: object,
    integers: tuple[str, ...] = (),
    reals: tuple[str, ...] = (),
    flags: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
) -> None:
    """Raise ``ConfigError`` for a field of the wrong type (not a ``TypeError`` later on) and store
    numbers as plain ``int`` / ``float`` (numpy scalars included). ``optional`` fields may be
    ``None``. Reals must be finite: an infinite or NaN learning rate or scale trains to NaN."""
    for name in integers + reals + flags:
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if name in flags:
            ok, expected = isinstance(value, bool), "true or false"
        elif name in integers:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            expected = "an integer"
        else:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)  # type: ignore[arg-type]
            expected = "a finite number"
        if not ok:
            expected += " or None" if name in optional else ""
            raise ConfigError(f"{type(config).__name__}.{name} must be {expected}, got {value!r}")
        if name in integers:
            object.__setattr__(config, name, int(value))
        elif name in reals:
            object.__setattr__(config, name, float(value))


@dataclass(frozen=True)
class BCQConfig:
    """How to quantize a model with binary-coding quantization.

    Args:
        bits: number of binary code planes q (1..8).
        group_size: input features sharing one set of scales. ``None``: one set per output row (the
            paper's row-wise BCQ). ``"auto"``: per layer, the divisor of ``in_features`` closest to
            128. An integer must divide the ``in_features`` of every quantized layer.
        method: fitting method (see ``QuantMethod``).
        iterations: alternating-least-squares rounds for ALTERNATING / OFFSET / CALIBRATED.
        include: glob patterns of module names to quantize; ``None`` means every ``nn.Linear``
            inside the transformer blocks (any element of an ``nn.ModuleList``).
        exclude: glob patterns of module names never quantized.
        packing: code layout.
        format_version: the layout version of a saved base (``alphatune.files``): what a
            loaded base's ``quantization_config`` says; ``save_quantized`` writes the version
            of the layout it writes, whatever this field holds.
        lm_head: the LM head for inference: ``"compact"`` (default: an 8-bit BCQ table, the
            embedding's own table when the model ties them and ``embedding`` is compact too),
            ``"keep"``, ``"bf16"`` or ``"bcq"`` (see ``alphatune.lm_head``). The head is never
            α-tuned.
        lm_head_bits: code planes of a ``"bcq"`` head (1..8); it uses this config's method, group
            size and iterations.
        embedding: the input embedding: ``"compact"`` (default: an 8-bit BCQ table whose rows are
            dequantized when looked up) or ``"keep"`` (see ``alphatune.embedding``). Never α-tuned.
        layer_bits: mixed precision: ``{pattern: bits}`` (or ``(pattern, bits)`` pairs), glob
            patterns of module names whose layers get other code planes than ``bits``; the
            first matching pattern wins (e.g. ``{"*.down_proj": 4}`` keeps the MLP's output
            projection at 4 bits, as llama.cpp's Q3_K_M keeps its ``ffn_down`` at more bits).
            Only the layers quantized as blocks are covered: a ``"bcq"`` head takes
            ``lm_head_bits``.

    Example:
        >>> cfg = BCQConfig(bits=3, group_size=64, method="offset")
        >>> cfg.method
        <QuantMethod.OFFSET: 'offset'>
    """

    # transformers reads this (from_pretrained(..., quantization_config=BCQConfig(...))); not a field.
    quant_method: ClassVar[str] = QUANT_METHOD

    bits: int = 3
    group_size: int | str | None = AUTO
    method: QuantMethod = QuantMethod.CALIBRATED
    iterations: int = 10
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ("*lm_head*",)
    packing: PackingFormat = PackingFormat.BITPLANE_U8
    format_version: int = BASE_FORMAT
    lm_head: LMHeadMode = LMHeadMode.COMPACT
    lm_head_bits: int = 4
    embedding: EmbeddingMode = EmbeddingMode.COMPACT
    layer_bits: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        for name in ("bits", "lm_head_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
                raise ConfigError(f"{name} must be an integer in 1..8, got {value!r}")
        try:
            object.__setattr__(self, "lm_head", LMHeadMode(self.lm_head))
        except ValueError:
            known = ", ".join(m.value for m in LMHeadMode)
            raise ConfigError(f"lm_head must be one of {known}; got {self.lm_head!r}") from None
        try:
            object.__setattr__(self, "embedding", EmbeddingMode(self.embedding))
        except ValueError:
            known = ", ".join(m.value for m in EmbeddingMode)
            raise ConfigError(f"embedding must be one of {known}; got {self.embedding!r}") from None
        gs = self.group_size
        if isinstance(gs, str) and gs != AUTO:
            raise ConfigError(f"group_size must be a positive integer, None or 'auto', got {gs!r}")
        if (
            gs is not None
            and not isinstance(gs, str)
            and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1)
        ):
            raise ConfigError(f"group_size must be a positive integer, None or 'auto', got {gs!r}")
        try:
            object.__setattr__(self, "method", QuantMethod(self.method))
        except ValueError:
            known = ", ".join(m.value for m in QuantMethod)
            raise ConfigError(f"method must be one of {known}; got {self.method!r}") from None
        try:
            object.__setattr__(self, "packing", PackingFormat(self.packing))
        except ValueError:
            known = ", ".join(p.value for p in PackingFormat)
            raise ConfigError(f"packing must be one of {known}; got {self.packing!r}") from None
        # Patterns may arrive as a string or a list (JSON, callers); keep a hashable tuple, and
        # never split a lone string into characters.
        if self.include is not None:
            object.__setattr__(self, "include", _patterns(self.include))
        object.__setattr__(self, "exclude", _patterns(self.exclude))
        _check_types(self, integers=("iterations", "format_version"))
        if self.iterations < 0:
            raise ConfigError(f"iterations must be >= 0, got {self.iterations}")
        object.__setattr__(self, "layer_bits", _layer_bits(self.layer_bits))

    def bits_for(self, name: str) -> int:
        """Code planes of the layer named ``name``: its first ``layer_bits`` match, else ``bits``."""
        for pattern, bits in self.layer_bits:
            if fnmatch.fnmatchcase(name, pattern):
                return bits
        return self.bits

    def group_size_for(self, in_features: int) -> int:
        """The group size used for a layer with ``in_features`` inputs (raises if it cannot fit)."""
        if self.group_size is None:
            return in_features
        if self.group_size == AUTO:
            divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
            # Closest to 128 on a log scale; ties go to the larger group (fewer scales to store).
            return min(divisors, key=lambda d: (abs(math.log(d / 128)), -d))
        if in_features % self.group_size:
            divisors = [d for d in range(8, in_features + 1, 8) if in_features % d == 0]
            raise ConfigError(
                f"group_size {self.group_size} does not divide in_features={in_features}; "
                f"choose one of {divisors[:12]} (or None for one group per row, or 'auto')"
            )
        return self.group_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["method"] = self.method.value
        data["packing"] = self.packing.value
        data["lm_head"] = self.lm_head.value
        data["embedding"] = self.embedding.value
        data["include"] = list(self.include) if self.include is not None else None
        data["exclude"] = list(self.exclude)
        del data["layer_bits"]
        if self.layer_bits:  # a uniform base's config reads as it did before the option existed
            # Pairs, not a mapping: configs are written with sorted keys, and the order of the
            # patterns decides which one a layer takes.
            data["layer_bits"] = [list(pair) for pair in self.layer_bits]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "quantization_config") -> BCQConfig:
        return _from_dict(cls, data, where)


@dataclass(frozen=True)
class AlphaTuningConfig:
    """What AlphaTuning trains; everything else (codes, other scales, embeddings, norms) is frozen.

    Args:
        train: ``"alpha1"`` (paper default) or ``"all_alpha"``.
        train_offset: also train the per-group offsets (OFFSET / CALIBRATED methods only).
        train_bias: also train the biases of quantized layers (an ablation in the paper).
        alpha_lr_scale: multiplies the learning rate of the scales. The paper scales α's update down
            because one α multiplies a whole row (or group); with Adam a gradient scale cancels out,
            so the knob is expressed on the learning rate.
        granularity: ``"group"`` trains one value per (row, group); ``"row"`` freezes α₁ and
            trains one multiplier per output row on top of it (``alpha1`` training only), the
            parameter count the paper's ">1,000x fewer" refers to.
        multiplier: with ``granularity="group"``, train a multiplier of each α₁ (initialised to 1)
            instead of α₁ itself: the same function, but Adam's steps become relative to each
            α₁'s size (on the 3-bit SmolLM2 base α₁ spans ~4x within a layer type: 0.10–0.44 for
            the attention projections, 5th–95th percentile). ``"row"`` is always a multiplier.
        alpha_grad_scale: ``"none"``, or ``"group_size"`` to divide the scales' gradients by the
            group size as the paper's Eq. 4 does. Adam largely cancels a constant factor; what is
            left acts through gradient clipping and Adam's epsilon (measured in docs/results.md).
    """

    train: TrainableScales = TrainableScales.ALPHA1
    train_offset: bool = False
    train_bias: bool = False
    alpha_lr_scale: float = 1.0
    granularity: Granularity = Granularity.GROUP
    alpha_grad_scale: AlphaGradScale = AlphaGradScale.NONE
    multiplier: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "train", TrainableScales(self.train))
        except ValueError:
            raise ConfigError(
                f"train must be 'alpha1' or 'all_alpha', got {self.train!r}"
            ) from None
        for name, kind in (("granularity", Granularity), ("alpha_grad_scale", AlphaGradScale)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                known = ", ".join(repr(k.value) for k in kind)
                raise ConfigError(
                    f"{name} must be one of {known}, got {getattr(self, name)!r}"
                ) from None
        if self.granularity == Granularity.ROW and self.train != TrainableScales.ALPHA1:
            raise ConfigError(
                "granularity='row' trains a multiplier of α₁ only; use train='alpha1' with it"
            )
        if self.multiplier is True and self.train != TrainableScales.ALPHA1:
            raise ConfigError("multiplier=True multiplies α₁ only; use train='alpha1' with it")
        _check_types(
            self, reals=("alpha_lr_scale",), flags=("train_offset", "train_bias", "multiplier")
        )
        if not self.alpha_lr_scale > 0:
            raise ConfigError(f"alpha_lr_scale must be > 0, got {self.alpha_lr_scale}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train"] = self.train.value
        data["granularity"] = self.granularity.value
        data["alpha_grad_scale"] = self.alpha_grad_scale.value
        return data

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], where: str = "alphatuning config"
    ) -> AlphaTuningConfig:
        return _from_dict(cls, data, where)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the paper's recipe (AdamW, linear decay with warm-up, label smoothing 0.1).

    ``max_steps`` bounds optimizer steps (``None``: run ``epochs`` full passes). One optimizer step
    consumes ``batch_size * grad_accum`` examples.
    """

    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.06
    label_smoothing: float = 0.1
    max_length: int = 128
    eval_every: int = 0
    checkpoint_every: int = 50
    seed: int = 0
    max_grad_norm: float | None = 1.0
    dropout: bool = False  # the paper's recipe: no dropout (the model runs in eval mode)

    def __post_init__(self) -> None:
        _check_types(
            self,
            integers=(
                "batch_size",
                "grad_accum",
                "max_steps",
                "max_length",
                "eval_every",
                "checkpoint_every",
                "seed",
            ),
            reals=(
                "learning_rate",
                "weight_decay",
                "epochs",
                "warmup_ratio",
                "label_smoothing",
                "max_grad_norm",
            ),
            flags=("dropout",),
            optional=("max_steps", "max_grad_norm"),
        )
        checks = {
            "learning_rate": self.learning_rate > 0,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "epochs": self.epochs > 0,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "label_smoothing": 0 <= self.label_smoothing < 1,
            "max_length": self.max_length >= 8,
            "eval_every": self.eval_every >= 0,
            "checkpoint_every": self.checkpoint_every >= 0,
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            raise ConfigError(f"invalid training settings: {values}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "training config") -> TrainConfig:
        return _from_dict(cls, data, where)
