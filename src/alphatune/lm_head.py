"""The LM head (output projection) for inference: keep it, store it in bf16, or quantize it with BCQ.

On small models the head is a large share of the bytes read per generated token: SmolLM2-135M's
head (tied to the input embedding) is 28.3M of its 134.5M parameters, 113 MB in fp32. Modes
(``BCQConfig.lm_head``):

- ``keep`` (default): the head is untouched.
- ``bf16``: the head becomes a ``BF16Linear``, a bfloat16 copy multiplied in bfloat16 that returns
  logits in the input's dtype.
- ``bcq``: the head becomes a ``BCQLinear`` of ``lm_head_bits`` planes, fitted with the config's
  method, group size and iterations; ``calibrated`` uses the statistics of the head's inputs in
  the model as it is when called (after ``quantize_`` has quantized the blocks).

A head tied to the input embedding is untied (``tie_word_embeddings=False``): the embedding stays
as it was, in full precision, for the lookup, which reads one row per token. So a replaced head
*adds* its own bytes to the model's memory while it cuts the bytes read per token.

A replaced head is frozen for AlphaTuning: the paper tunes the scales of the block linears only,
and a head's α would add ``vocab × groups`` parameters to every adapter. It is therefore not part
of the base fingerprint that adapters check (an adapter tuned on a base loads on the same base with
any head); ``save_quantized`` records its own fingerprint of the head's codes, checked on load.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alphatune import bcq
from alphatune.config import BCQConfig, LMHeadMode, QuantMethod
from alphatune.errors import ConfigError, UnsupportedModelError
from alphatune.gptq import fit_calibrated
from alphatune.layers import BCQLinear, fit_weight
from alphatune.models import model_device

logger = logging.getLogger(__name__)

# Key in the model's __dict__ of the ReplacedHead record (what save_quantized writes).
_RECORD = "_alphatune_lm_head"
# Rows fitted at once: every row's fit is independent, and a whole 49k-row head would need GBs.
FIT_ROWS = 8192


@dataclass(frozen=True)
class ReplacedHead:
    """What ``quantize_lm_head`` did to a model: which module, how, and whether it was tied."""

    module: str  # qualified name of the head, e.g. "lm_head"
    mode: LMHeadMode
    untied: bool  # the head was the input embedding's tensor before

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "mode": self.mode.value, "untied": self.untied}

    @classmethod
    def from_dict(cls, data: object, where: str = "lm_head") -> ReplacedHead:
        if not isinstance(data, dict) or not isinstance(data.get("module"), str):
            raise ConfigError(f"{where}: expected an object with 'module', 'mode', 'untied'")
        try:
            mode = LMHeadMode(data.get("mode"))
        except ValueError:
            raise ConfigError(f"{where}: unknown LM head mode {data.get('mode')!r}") from None
        if mode == LMHeadMode.KEEP:
            raise ConfigError(f"{where}: a replaced head cannot have mode 'keep'")
        return cls(module=data["module"], mode=mode, untied=bool(data.get("untied", False)))


class BF16Linear(nn.Linear):
    """A linear layer stored and multiplied in bfloat16 that returns the input's dtype.

    The bias (if any) stays float32 and is added after the product.

    Example:
        >>> head = BF16Linear.from_linear(nn.Linear(64, 128, bias=False))
        >>> head(torch.randn(2, 64)).dtype
        torch.float32
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        # nn.Linear.__init__ would initialise a float32 weight; only the module machinery is wanted.
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.bfloat16, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        """A bfloat16 copy of ``linear`` (its weight is rounded to the nearest bfloat16)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight.detach().to(torch.bfloat16))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        layer.train(linear.training)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def find_lm_head(model: nn.Module) -> tuple[str, nn.Module]:
    """``(qualified name, module)`` of the model's output projection (``get_output_embeddings``)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None); "
            "lm_head options need a causal LM with an LM head"
        )
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not name:
        raise UnsupportedModelError(f"the LM head of {type(model).__name__} is not a submodule")
    return name, head


def replaced_head(model: nn.Module) -> ReplacedHead | None:
    """The record of a head replaced by ``quantize_lm_head`` (or loaded so), else ``None``."""
    record = model.__dict__.get(_RECORD)
    return record if isinstance(record, ReplacedHead) else None


def replaced_head_module(model: nn.Module) -> nn.Module | None:
    """The module of a replaced head (a ``BF16Linear`` or ``BCQLinear``), else ``None``."""
    record = replaced_head(model)
    return None if record is None else model.get_submodule(record.module)


def set_replaced_head(model: nn.Module, record: ReplacedHead) -> None:
    """Mark ``model``'s head as replaced (``load_quantized`` restores the mark from the file)."""
    model.__dict__[_RECORD] = record


def untie_word_embeddings(model_or_config: Any) -> None:
    """Set ``tie_word_embeddings=False`` on a model's configs (or on one config), so that
    ``tie_weights`` never puts the embedding back into the replaced head."""
    configs = [model_or_config]
    if isinstance(model_or_config, nn.Module):
        configs = [m.config for m in model_or_config.modules() if hasattr(m, "config")]
    for config in configs:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None
        for c in (config, text):
            if c is not None and getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    if isinstance(model_or_config, nn.Module) and hasattr(model_or_config, "all_tied_weights_keys"):
        # transformers caches the tying map at init; recompute it from the changed config.
        model_or_config.all_tied_weights_keys = model_or_config.get_expanded_tied_weights_keys(
            all_submodels=True
        )


def _check_calibration(calibration: Tensor) -> None:
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise ConfigError(
            "calibration must be integer token ids of shape (n_sequences, seq_len), got "
            f"{calibration.dtype} {tuple(calibration.shape)}"
        )


class _HeadReached(Exception):
    """Raised by a hook once the head's input is recorded: the head's product is not needed."""


def collect_head_hessian(model: nn.Module, calibration: Tensor, batch_size: int = 4) -> Tensor:
    """``H = Σ_t x_t x_tᵀ`` of the LM head's input over calibration sequences.

    The forward stops before the head (the ``vocab``-wide product is not needed).

    Args:
        calibration: ``(n_sequences, seq_len)`` token ids.

    Returns:
        ``(hidden, hidden)`` float32.
    """
    _check_calibration(calibration)
    _, head = find_lm_head(model)
    sums: list[Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (tokens, hidden)
        sums.append(x.T @ x)
        raise _HeadReached

    handle = head.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()  # dropout would add noise to the statistics
    try:
        with torch.no_grad():
            for start in range(0, calibration.shape[0], batch_size):
                batch = calibration[start : start + batch_size].to(model_device(model))
                try:
                    model(input_ids=batch, use_cache=False)
                except _HeadReached:
                    pass
    finally:
        handle.remove()
        model.train(was_training)
    if not sums:
        raise ConfigError("calibration holds no sequences")
    return torch.stack(sums).sum(0)


def _fit_rows(
    weight: Tensor, hessian: Tensor | None, config: BCQConfig, group_size: int
) -> bcq.BCQWeight:
    """Fit the head ``FIT_ROWS`` rows at a time (every row's fit is independent of the others)."""
    bits = config.lm_head_bits
    data_free = dataclasses.replace(config, bits=bits)
    parts = []
    for start in range(0, weight.shape[0], FIT_ROWS):
        rows = weight[start : start + FIT_ROWS]  # (rows, in)
        if hessian is not None:
            parts.append(fit_calibrated(rows, hessian, bits, group_size, config.iterations))
        else:
            parts.append(fit_weight(rows, data_free, group_size))
    offsets = [p.offset for p in parts if p.offset is not None]
    return bcq.BCQWeight(
        codes=torch.cat([p.codes for p in parts], dim=1),  # (q, out, in)
        alpha=torch.cat([p.alpha for p in parts], dim=1),  # (q, out, G)
        offset=torch.cat(offsets) if offsets else None,  # (out, G)
        group_size=group_size,
    )


def check_lm_head(model: nn.Module, config: BCQConfig, has_calibration: bool = False) -> None:
    """Raise now, before minutes of work, if ``quantize_lm_head(model, config)`` would fail.

    ``has_calibration``: calibration data (or the head's Hessian) will be passed.
    """
    if config.lm_head == LMHeadMode.KEEP:
        return
    name, head = find_lm_head(model)
    done = replaced_head(model)
    if done is not None:
        raise ConfigError(
            f"the LM head {name!r} was already replaced ({done.mode.value}); start from a model "
            "whose head is unchanged"
        )
    if type(head) is not nn.Linear:
        raise UnsupportedModelError(
            f"the LM head {name!r} is a {type(head).__name__}; lm_head={config.lm_head.value!r} "
            "needs an nn.Linear (a head quantized through include patterns cannot be replaced)"
        )
    if config.lm_head == LMHeadMode.BCQ:
        config.group_size_for(head.in_features)  # raises with the divisors that would fit
        if config.method == QuantMethod.CALIBRATED and not has_calibration:
            raise ConfigError(
                "lm_head='bcq' with method 'calibrated' needs calibration token ids "
                "(n_sequences, seq_len); pass calibration=..., or choose a data-free method"
            )


def quantize_lm_head(
    model: nn.Module,
    config: BCQConfig,
    *,
    calibration: Tensor | None = None,
    hessian: Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReplacedHead | None:
    """Replace the model's LM head as ``config.lm_head`` says, in place; ``None`` for ``"keep"``.

    ``quantize_(model, config)`` calls this after the blocks; call it directly to change the head
    of a model that is already quantized (or not quantized at all).

    Args:
        model: a causal LM with ``get_output_embeddings()``.
        config: ``lm_head`` (mode), and for ``"bcq"``: ``lm_head_bits``, ``method``,
            ``group_size``, ``iterations``.
        calibration: ``(n_sequences, seq_len)`` token ids, for a ``"bcq"`` head with method
            ``"calibrated"`` (ignored otherwise).
        hessian: ``(hidden, hidden)`` statistics of the head's input from
            ``collect_head_hessian``, instead of ``calibration`` (to fit several heads from one pass).
        progress: called with a stage name before slow steps.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64,
        ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
        >>> quantize_lm_head(model, BCQConfig(lm_head="bf16")).mode
        <LMHeadMode.BF16: 'bf16'>
    """
    check_lm_head(model, config, has_calibration=calibration is not None or hessian is not None)
    if config.lm_head == LMHeadMode.KEEP:
        return None
    name, head = find_lm_head(model)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    untied = embedding is not None and head.weight is getattr(embedding, "weight", None)
    if config.lm_head == LMHeadMode.BF16:
        new: nn.Module = BF16Linear.from_linear(head)
    else:
        weight = head.weight.detach()  # (vocab, hidden)
        if config.method != QuantMethod.CALIBRATED:
            hessian = None
        elif hessian is None:
            assert calibration is not None  # check_lm_head
            if progress:
                progress("calibrating lm_head")
            hessian = collect_head_hessian(model, calibration)
        elif hessian.shape != (weight.shape[1], weight.shape[1]):
            raise ConfigError(
                f"hessian has shape {tuple(hessian.shape)}; the head's input has "
                f"{weight.shape[1]} features"
            )
        if progress:
            progress(f"fitting {name}")
        group_size = config.group_size_for(weight.shape[1])
        fitted = _fit_rows(
            weight.float().cpu(),
            None if hessian is None else hessian.float().cpu(),
            config,
            group_size,
        )
        new = BCQLinear.from_weight(fitted, head.bias).to(weight.device)
        new.train(head.training)
    model.set_submodule(name, new)
    untie_word_embeddings(model)
    record = ReplacedHead(module=name, mode=config.lm_head, untied=untied)
    set_replaced_head(model, record)
    logger.info(
        "LM head %s replaced: %s%s", name, config.lm_head.value, " (untied)" if untied else ""
    )
    return record
