"""The LM head (output projection) and input embedding for inference: compact, kept, bf16 or BCQ.

On small models the head is a large share of the bytes read per generated token: SmolLM2-135M's
head (tied to the input embedding) is 28.3M of its 134.5M parameters, 113 MB in fp32. Modes
(``BCQConfig.lm_head``):

- ``compact`` (default): the head becomes a ``BCQHead`` over an 8-bit BCQ table
  (``alphatune.embedding``). A head tied to the input embedding uses the embedding's table when
  the embedding is compact too (``BCQConfig.embedding``, default ``compact``): one table serves
  the lookup and the logits, and the model stays tied. Otherwise the head gets its own table.
- ``keep``: the head is untouched.
- ``bf16``: the head becomes a ``BF16Linear``, a bfloat16 copy multiplied in bfloat16 that returns
  logits in the input's dtype.
- ``bcq``: the head becomes a ``BCQLinear`` of ``lm_head_bits`` planes, fitted with the config's
  method, group size and iterations; ``calibrated`` uses the statistics of the head's inputs in
  the model as it is when called (after ``quantize_`` has quantized the blocks).

A head tied to the input embedding and replaced by a ``bf16``, ``bcq`` or own-table head is
untied (``tie_word_embeddings=False``): the embedding stays for the lookup (compact or fp32), so
such a head *adds* its own bytes to the model's memory while it cuts the bytes read per token.
The config flag is false for every replaced head (transformers must never re-tie it); a shared
table is tied by construction.

``compact`` is a default, so it never fails a model: a head or embedding it cannot handle (no
output embeddings, not an ``nn.Linear`` / ``nn.Embedding``, already quantized through include
patterns) is kept, with the reason logged. ``bf16`` and ``bcq`` are explicit and raise.

A replaced head is frozen for AlphaTuning: the paper tunes the scales of the block linears only,
and a head's α would add ``vocab × groups`` parameters to every adapter. It is therefore not part
of the base fingerprint that adapters check (an adapter tuned on a base loads on the same base with
any head); ``save_quantized`` records its own fingerprint of the head's codes, checked on load.
A compact embedding changes what the blocks see, so it is part of the base fingerprint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alphatune.calibration import (
    check_calibration,
    eval_mode,
    recording_hessians,
    run_batches,
)
from alphatune.config import BCQConfig, EmbeddingMode, LMHeadMode, QuantMethod
from alphatune.embedding import (
    BCQEmbedding,
    BCQHead,
    BCQTable,
    TableSpec,
    supported_embedding,
)
from alphatune.errors import ConfigError, UnsupportedModelError
from alphatune.fitting import FIT_ROWS  # noqa: F401  (kept importable from here)
from alphatune.layers import BCQLinear
from alphatune.state import existing_state, model_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplacedHead:
    """What ``quantize_lm_head`` did to a model: which module, how, and whether it was tied."""

    module: str  # qualified name of the head, e.g. "lm_head"
    mode: LMHeadMode
    untied: bool  # the head was the input embedding's tensor before, and is no more
    # A compact head: the embedding module whose table it uses (tied), or its own table's shape.
    shares: str | None = None
    table: TableSpec | None = None
    bias: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "module": self.module,
            "mode": self.mode.value,
            "untied": self.untied,
        }
        if self.mode == LMHeadMode.COMPACT:
            data["shares"] = self.shares
            data["table"] = None if self.table is None else self.table.to_dict()
            data["bias"] = self.bias
        return data

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
        untied = bool(data.get("untied", False))
        if mode != LMHeadMode.COMPACT:
            return cls(module=data["module"], mode=mode, untied=untied)
        shares, table = data.get("shares"), data.get("table")
        if (shares is None) == (table is None) or not isinstance(shares, (str, type(None))):
            raise ConfigError(
                f"{where}: a compact head names either the embedding it shares ('shares') or "
                "its own table ('table'), exactly one"
            )
        spec = None if table is None else TableSpec.from_dict(table, f"{where}: table")
        if not isinstance(data.get("bias", False), bool):
            raise ConfigError(f"{where}: 'bias' must be true or false")
        return cls(
            module=data["module"],
            mode=mode,
            untied=untied,
            shares=shares,
            table=spec,
            bias=bool(data.get("bias", False)),
        )


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
    state = existing_state(model)
    return None if state is None else state.head


def replaced_head_module(model: nn.Module) -> nn.Module | None:
    """The module of a replaced head (a ``BF16Linear`` or ``BCQLinear``), else ``None``."""
    record = replaced_head(model)
    return None if record is None else model.get_submodule(record.module)


def set_replaced_head(model: nn.Module, record: ReplacedHead) -> None:
    """Mark ``model``'s head as replaced (``load_quantized`` restores the mark from the file)."""
    model_state(model).set_head(record)


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


def collect_head_hessian(model: nn.Module, calibration: Tensor, batch_size: int = 4) -> Tensor:
    """``H = Σ_t x_t x_tᵀ`` of the LM head's input over calibration sequences.

    The forward stops before the head (the ``vocab``-wide product is not needed).

    Args:
        calibration: ``(n_sequences, seq_len)`` token ids.

    Returns:
        ``(hidden, hidden)`` float32.
    """
    check_calibration(calibration)
    _, head = find_lm_head(model)
    # The pass stops at the head: its vocab-wide product is not needed.
    with (
        recording_hessians({"head": head}, stop=True) as hessians,
        eval_mode(model),
        torch.no_grad(),
    ):
        run_batches(model, calibration, batch_size, use_cache=False)
    if "head" not in hessians:
        raise ConfigError("calibration holds no sequences")
    return hessians["head"]


def _compact_head_problem(model: nn.Module) -> str | None:
    """Why a compact head cannot replace the model's head (``None``: it can)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return "the model has no output embeddings"
    if replaced_head(model) is not None:
        return "the head was already replaced"
    if type(head) is not nn.Linear:
        return f"the head is a {type(head).__name__}, not an nn.Linear"
    if head.weight.is_meta:
        return "the head's weight is not loaded (meta device)"
    return None


def check_lm_head(model: nn.Module, config: BCQConfig, has_calibration: bool = False) -> None:
    """Raise now, before minutes of work, if ``quantize_lm_head(model, config)`` would fail.

    ``has_calibration``: calibration data (or the head's Hessian) will be passed. The compact
    modes never fail (what they cannot handle is kept); ``bf16`` and ``bcq`` heads raise.
    """
    if config.lm_head in (LMHeadMode.KEEP, LMHeadMode.COMPACT):
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


def _input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        module = get() if callable(get) else None
    except NotImplementedError:  # transformers' base implementation for models without one
        module = None
    if module is None:
        return None
    name = next((n for n, m in model.named_modules() if m is module), None)
    return None if not name else (name, module)


def _compact_embedding_(model: nn.Module, config: BCQConfig) -> tuple[str, BCQEmbedding] | None:
    """Replace the input embedding by a ``BCQEmbedding`` if ``config`` asks and it qualifies;
    returns the compact embedding (also one that already was), else ``None``."""
    found = _input_embedding(model)
    if found is None:
        if config.embedding == EmbeddingMode.COMPACT:
            logger.info("input embedding kept: the model has none (get_input_embeddings)")
        return None
    name, module = found
    if isinstance(module, BCQEmbedding):
        return name, module
    if config.embedding != EmbeddingMode.COMPACT:
        return None
    reason = supported_embedding(module)
    if reason is not None:
        logger.info("input embedding %s kept in full precision: %s", name, reason)
        return None
    compact = BCQEmbedding.from_embedding(module)
    model.set_submodule(name, compact)
    logger.info("input embedding %s compacted: %s", name, compact.extra_repr())
    return name, compact


def quantize_lm_head(
    model: nn.Module,
    config: BCQConfig,
    *,
    calibration: Tensor | None = None,
    hessian: Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> ReplacedHead | None:
    """Replace the model's LM head and input embedding as ``config.lm_head`` and
    ``config.embedding`` say, in place; returns the head's record, ``None`` if it is kept.

    ``quantize_(model, config)`` calls this after the blocks; call it directly to change the head
    and embedding of a model that is already quantized (or not quantized at all).

    Args:
        model: a causal LM with ``get_output_embeddings()``.
        config: ``lm_head`` and ``embedding`` (modes), and for a ``"bcq"`` head:
            ``lm_head_bits``, ``method``, ``group_size``, ``iterations``.
        calibration: ``(n_sequences, seq_len)`` token ids, for a ``"bcq"`` head with method
            ``"calibrated"`` (ignored otherwise).
        hessian: ``(hidden, hidden)`` statistics of the head's input from
            ``collect_head_hessian``, instead of ``calibration`` (to fit several heads from one pass).
        progress: called with a stage name before slow steps.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64,
        ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        ...     tie_word_embeddings=True))
        >>> record = quantize_lm_head(model, BCQConfig())
        >>> record.mode, record.shares
        (<LMHeadMode.COMPACT: 'compact'>, 'model.embed_tokens')
    """
    check_lm_head(model, config, has_calibration=calibration is not None or hessian is not None)
    mode = config.lm_head
    if mode == LMHeadMode.COMPACT:
        problem = _compact_head_problem(model)
        if problem is not None:
            logger.info("LM head kept: %s", problem)
            mode = LMHeadMode.KEEP
    get = getattr(model, "get_output_embeddings", None)
    head_found = find_lm_head(model) if callable(get) and get() is not None else None
    found = _input_embedding(model)
    # Parameters only: a compact module's ``weight`` is a property that dequantizes.
    head_weight = None if head_found is None else head_found[1]._parameters.get("weight")
    tied = head_weight is not None and found is not None
    tied = tied and head_weight is found[1]._parameters.get("weight")
    if progress and (config.embedding == EmbeddingMode.COMPACT or mode != LMHeadMode.KEEP):
        progress("compacting the embedding and LM head")
    embedding = _compact_embedding_(model, config)
    if mode == LMHeadMode.KEEP:
        if tied and embedding is not None:
            # The fp32 head keeps the weight as its own; transformers must not re-tie it.
            untie_word_embeddings(model)
            logger.info("LM head kept in full precision, untied from the compact embedding")
        return None
    assert head_found is not None  # check_lm_head / _compact_head_problem
    name, head = head_found
    bias = head.bias is not None
    record = ReplacedHead(module=name, mode=mode, untied=tied)
    if mode == LMHeadMode.COMPACT:
        if tied and embedding is not None:
            new: nn.Module = BCQHead.sharing(embedding[1], bias=bias)
            record = ReplacedHead(
                module=name, mode=mode, untied=False, shares=embedding[0], bias=bias
            )
        else:
            if progress:
                progress(f"fitting {name}")
            table = BCQTable.from_weight(head.weight)
            new = BCQHead.owning(table, bias=bias)
            record = ReplacedHead(module=name, mode=mode, untied=tied, table=table.spec, bias=bias)
        if bias:
            with torch.no_grad():
                new.bias.copy_(head.bias.detach().float())
    elif mode == LMHeadMode.BF16:
        new = BF16Linear.from_linear(head)
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
        new = BCQLinear.from_linear(head, config, bits=config.lm_head_bits, hessian=hessian)
    model.set_submodule(name, new)
    untie_word_embeddings(model)
    set_replaced_head(model, record)
    logger.info(
        "LM head %s replaced: %s%s",
        name,
        mode.value,
        " (untied)"
        if record.untied
        else " (shares the embedding's table)"
        if record.shares
        else "",
    )
    return record
