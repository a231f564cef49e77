"""Mixed-task batches: every row of a batch with its own task adapter, one shared base.

An AlphaTuning adapter is one α₁ tensor per quantized layer; the binary codes, the other scales and
every unquantized weight are shared by all tasks. So several adapters can serve one batch: each
``BCQLinear`` keeps a bank of the loaded adapters' α₁, ``(A, out, G)``, and each row picks its
entry (``kernels.bcq_matmul_mixed``). The result for a row is what that row gives alone with its
adapter loaded by ``load_adapter``.

Adapters resident on the model (``alphatune.load_adapter(model, dir, adapter_name=...)``) serve
mixed batches too: ``generate(..., adapters=[...])`` builds the bank it needs (``bank_for``).

Example:
    >>> bank = load_adapters(model, {"e2e": "adapter-e2e", "webnlg": "adapter-webnlg"})
    >>> with torch.inference_mode(), bank.rows(["e2e", "webnlg", None]):  # None: the base
    ...     logits = model(input_ids=ids).logits  # ids: (3, S)
    >>> answers = generate(model, tokenizer, prompts, adapters=["e2e", "webnlg", "e2e"])
    >>> bank.remove()

Mixed batches are for inference: a forward that would need gradients raises ``ConfigError``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alphatune.adapters import check_adapter_name, read_adapter, resident_adapter
from alphatune.bases import base_fingerprint
from alphatune.errors import CheckpointError, ConfigError
from alphatune.files import ADAPTER_WEIGHTS
from alphatune.layers import ALPHA1_SCALE, BCQLinear
from alphatune.quantize import quantized_layers
from alphatune.state import ResidentAdapter, existing_state, model_state

logger = logging.getLogger(__name__)


class AdapterBank:
    """Task adapters loaded side by side on one quantized model (made by ``load_adapters``).

    Bank entry 0 is the base (a row named ``None``); entry ``i`` is ``names[i - 1]``.
    """

    def __init__(
        self, layers: list[BCQLinear], names: tuple[str, ...], configs: dict[str, dict[str, Any]]
    ) -> None:
        self._layers = layers
        self.names = names
        self.configs = configs  # adapter_config.json of each adapter, by name
        self._index = {name: i + 1 for i, name in enumerate(names)}
        self._loaded = True

    @property
    def loaded(self) -> bool:
        """False once removed (``remove``, ``unload_adapters`` or a later ``load_adapters``)."""
        return self._loaded

    def indices(self, rows: Sequence[str | None]) -> Tensor:
        """Bank index of every row's adapter, ``(B,)`` int64 (0 for ``None``, the base).

        Raises:
            ConfigError: a name that is not loaded, a bank that was removed, or a bare string.
        """
        self._check_loaded()
        if isinstance(rows, str):
            raise ConfigError(
                f"adapter rows must be a list with one name per batch row, got the string {rows!r}"
            )
        if len(rows) == 0:
            raise ConfigError("adapter rows are empty; give one adapter name per batch row")
        unknown = sorted(
            {str(name) for name in rows if name is not None and name not in self._index}
        )
        if unknown:
            raise ConfigError(
                f"unknown adapter(s) {', '.join(map(repr, unknown))}; loaded: "
                f"{', '.join(map(repr, self.names))} (None for the base)"
            )
        return torch.tensor([0 if name is None else self._index[name] for name in rows])

    @contextmanager
    def rows(self, rows: Sequence[str | None]) -> Iterator[None]:
        """For the duration, batch row ``b`` of every forward uses the adapter ``rows[b]``.

        Every input batch must have ``len(rows)`` rows. ``model.generate`` with beam search runs
        ``num_beams`` rows per prompt (beams of one prompt next to each other): repeat each name
        ``num_beams`` times, or use ``alphatune.evaluate.generate(..., adapters=...)``, which
        does. Not thread-safe: the rows are set on the model's layers.

        Args:
            rows: one loaded adapter name (or ``None``, the base) per batch row.
        """
        index = self.indices(rows)
        per_device: dict[torch.device, Tensor] = {}
        previous = [layer.adapter_rows for layer in self._layers]
        try:
            for layer in self._layers:
                assert layer.alpha1_bank is not None  # set by load_adapters, cleared by remove
                device = layer.alpha1_bank.device
                if device not in per_device:
                    per_device[device] = index.to(device)
                layer.set_adapter_rows(per_device[device])
            yield
        finally:
            for layer, value in zip(self._layers, previous, strict=True):
                layer.set_adapter_rows(value)

    def remove(self) -> None:
        """Drop the bank from every layer: forwards use the layers' own α₁ again."""
        if not self._loaded:
            return
        for layer in self._layers:
            layer.set_adapter_bank(None)
        self._loaded = False

    def _check_loaded(self) -> None:
        if not self._loaded:
            raise ConfigError(
                "this adapter bank was removed (remove, unload_adapters or a later "
                "load_adapters); load the adapters again with load_adapters"
            )

    def __repr__(self) -> str:
        state = "" if self._loaded else ", removed"
        return f"AdapterBank(names={list(self.names)}, layers={len(self._layers)}{state})"


def load_adapters(model: nn.Module, adapters: Mapping[str, str | os.PathLike[str]]) -> AdapterBank:
    """Load several adapters side by side for mixed-task batches; replaces an earlier bank.

    Each adapter is checked like ``load_adapter`` does (format, base fingerprint, tensor names and
    shapes) before the model changes; it must hold only α₁ tensors, the one scale a mixed batch
    can vary per row. Each becomes resident under its name (``alphatune.adapters``: ``set_adapter``
    can serve it alone); none becomes active. Layers an adapter leaves out keep the base α₁. The
    layers' own scales (and the active adapter) are untouched: they serve forwards outside
    ``bank.rows``. The bank is a non-persistent buffer (not saved, moved by ``model.to``).

    Args:
        model: a quantized model (``BCQLinear`` layers).
        adapters: name -> adapter directory, e.g. ``{"e2e": "runs/e2e", "webnlg": "runs/webnlg"}``.

    Returns:
        The bank; ``bank.rows([...])`` selects the adapter of each batch row.

    Raises:
        CheckpointError: an adapter for another base, a corrupted one, or one that tuned more
            than α₁ (the file is named).
        ConfigError: no adapters, an empty name, or a model without ``BCQLinear`` layers.
    """
    layers = _layers(model)
    if not adapters:
        raise ConfigError("no adapters given; pass {name: adapter directory, ...}")
    for name in adapters:
        check_adapter_name(name)
    fingerprint = base_fingerprint(model)
    read = {}
    for name, directory in adapters.items():
        config, tensors = read_adapter(model, directory, fingerprint)
        read[name] = ResidentAdapter(Path(directory), config, tensors)
        _check_only_alpha1(read[name], layers)
    state = model_state(model)
    for name, adapter in read.items():
        state.add_adapter(name, adapter)
    bank = _build_bank(model, layers, read)
    logger.info("loaded %d adapters for mixed batches: %s", len(adapters), ", ".join(adapters))
    return bank


def bank_for(model: nn.Module, rows: Sequence[str | None]) -> AdapterBank:
    """A bank serving every row's adapter (``None``: the base): the model's bank if it holds
    them all, else a new one (replacing it) built from the resident adapters of those names
    (``alphatune.load_adapter``).

    Raises:
        ConfigError: a name that is not resident (the resident ones are named), or a bare string.
        CheckpointError: a resident adapter that tuned more than α₁.
    """
    if isinstance(rows, str):
        raise ConfigError(
            f"adapter rows must be a list with one name per batch row, got the string {rows!r}"
        )
    names = [name for name in dict.fromkeys(rows) if name is not None]
    bank = adapter_bank(model)
    if bank is not None and set(names) <= set(bank.names):
        return bank
    layers = _layers(model)
    residents = {name: resident_adapter(model, name) for name in names}
    for adapter in residents.values():
        _check_only_alpha1(adapter, layers)
    return _build_bank(model, layers, residents)


def _layers(model: nn.Module) -> dict[str, BCQLinear]:
    layers = dict(quantized_layers(model))
    if not layers:
        raise ConfigError("the model has no BCQLinear layers: quantize it or load a base first")
    return layers


def _check_only_alpha1(adapter: ResidentAdapter, layers: Mapping[str, BCQLinear]) -> None:
    """A mixed batch shares everything except α₁ (and its multiplier): refuse other tensors."""
    for tensor_name in adapter.tensors:
        layer_name, _, attribute = tensor_name.rpartition(".")
        if attribute not in ("alpha1", ALPHA1_SCALE) or layer_name not in layers:
            raise CheckpointError(
                f"{adapter.directory / ADAPTER_WEIGHTS}: holds {tensor_name!r}, but a mixed "
                "batch shares everything except α₁ (the adapter was tuned with more than "
                "alpha1); use it alone with load_adapter"
            )


def _build_bank(
    model: nn.Module, layers: Mapping[str, BCQLinear], adapters: Mapping[str, ResidentAdapter]
) -> AdapterBank:
    """Stack each layer's α₁ for the base and every adapter, set it on the layers, and make it
    the model's bank (an earlier bank is removed)."""
    state = model_state(model)
    previous = state.pop_bank()
    if previous is not None:
        previous.remove()
    base = state.base_state(model)

    def effective_alpha1(adapter: ResidentAdapter, layer_name: str, own: Tensor) -> Tensor:
        """The α₁ an adapter's rows use: its own α₁ (or the base's) times its multiplier."""
        alpha1 = adapter.tensors.get(f"{layer_name}.alpha1", own)
        scale = adapter.tensors.get(f"{layer_name}.{ALPHA1_SCALE}")
        return alpha1 if scale is None else alpha1 * scale  # (out, G) * (out, 1) or (out, G)

    banked = []
    with torch.no_grad():
        for layer_name, layer in layers.items():
            own = base[f"{layer_name}.alpha1"]  # (out, G)
            entries = [own] + [effective_alpha1(a, layer_name, own) for a in adapters.values()]
            like = layer.effective_alpha1()
            stacked = torch.stack([e.to(like.device, like.dtype) for e in entries])  # (A, out, G)
            # A layer every row sees with its current α₁ (say a frozen replaced head) keeps the
            # plain forward: the same result without the mixed kernel.
            same = bool((stacked == like.detach()).all())
            layer.set_adapter_bank(None if same else stacked)
            if not same:
                banked.append(layer)
    bank = AdapterBank(banked, tuple(adapters), {n: a.config for n, a in adapters.items()})
    state.set_bank(bank)
    return bank


def adapter_bank(model: nn.Module) -> AdapterBank | None:
    """The model's loaded bank, or ``None``."""
    state = existing_state(model)
    return None if state is None else state.bank


def unload_adapters(model: nn.Module) -> None:
    """Undo ``load_adapters``: remove the model's bank, if any, and forget the adapters in it
    (if one of them was active, the base comes back; other resident adapters stay)."""
    state = existing_state(model)
    bank = None if state is None else state.pop_bank()
    if bank is None:
        return
    bank.remove()
    for name in bank.names:
        if name in state.adapters:
            state.remove_adapter(model, name)


@contextmanager
def adapter_rows(model: nn.Module, rows: Sequence[str | None]) -> Iterator[None]:
    """``with adapter_rows(model, ["e2e", "webnlg"]):`` — ``bank.rows`` for the model's bank."""
    bank = adapter_bank(model)
    if bank is None:
        raise ConfigError(
            "no adapters are loaded for mixed batches; call "
            "alphatune.mixed.load_adapters(model, {name: directory, ...}) first"
        )
    with bank.rows(rows):
        yield
