"""What alphatune keeps on a model besides its modules and tensors, declared in one place.

One ``ModelState`` per model (``model_state``), under one attribute, holding:

- ``head``: the record of an LM head replaced by ``quantize_lm_head`` or loaded so (what a saved
  base writes as "head"); changed only through ``alphatune.lm_head.set_replaced_head``;
- the adapter registry:
  - the adapters resident on the model by name (read and checked once; ``adapters``,
    ``add_adapter``, ``remove_adapter``) and which one is active (``active``, ``activate``,
    ``deactivate``), which ``alphatune.adapters``' verbs (``load_adapter``, ``set_adapter``,
    ``delete_adapter``, ``unload_adapter``) change;
  - the base value of every tensor the active adapter replaced (so that switching or unloading
    restores it; ``base_state``);
  - the bank of adapters side by side for mixed batches (``alphatune.mixed``; ``bank``,
    ``set_bank``, ``pop_bank``), dropped when an adapter in it is replaced or deleted.

Nothing else sets attributes on a model; ``copy.deepcopy(model)`` copies the state with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from alphatune.lm_head import ReplacedHead
    from alphatune.mixed import AdapterBank

# The one attribute of a model that holds its ModelState.
STATE_ATTRIBUTE = "_alphatune_state"


def tensors_by_name(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` by state-dict name."""
    return dict(model.named_parameters()) | dict(model.named_buffers())


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter read from ``directory`` and checked against the model, kept in memory (only
    its trained tensors: α₁ and the like, a few MB) so that switching to it reads no file."""

    directory: Path
    config: dict[str, Any]  # its adapter_config.json
    tensors: dict[str, Tensor]  # state-dict name -> trained value


class ModelState:
    """alphatune's state on one model (see the module docstring); change it through its methods."""

    def __init__(self) -> None:
        self._head: ReplacedHead | None = None
        self._base_values: dict[str, Tensor] = {}  # tensor name -> its value without an adapter
        self._adapters: dict[str, ResidentAdapter] = {}
        self._active: str | None = None
        self._bank: AdapterBank | None = None

    # ------------------------------------------------------------ the LM head
    @property
    def head(self) -> ReplacedHead | None:
        return self._head

    def set_head(self, record: ReplacedHead | None) -> None:
        self._head = record

    # ------------------------------------------------------------ resident adapters
    @property
    def adapters(self) -> Mapping[str, ResidentAdapter]:
        """The resident adapters by name, in loading order (read-only)."""
        return MappingProxyType(self._adapters)

    @property
    def active(self) -> str | None:
        """The name of the adapter whose tensors the model holds now, or ``None`` (the base)."""
        return self._active

    def add_adapter(self, name: str, adapter: ResidentAdapter) -> None:
        """Keep ``adapter`` under ``name``, replacing one of that name (a bank holding the old
        one is dropped: its values would be stale). Does not activate it."""
        if name in self._adapters:
            self._drop_bank_with(name)
        self._adapters[name] = adapter

    def remove_adapter(self, model: nn.Module, name: str) -> None:
        """Forget the adapter ``name``; the base comes back if it was active, and a bank
        holding it is dropped."""
        if self._active == name:
            self.deactivate(model)
        self._drop_bank_with(name)
        del self._adapters[name]

    def activate(self, model: nn.Module, name: str) -> None:
        """Restore the base values, then copy the resident adapter ``name``'s tensors into the
        model's tensors of the same names, keeping each base value the first time it is
        replaced."""
        targets = tensors_by_name(model)
        self._restore(model)
        with torch.no_grad():
            for tensor_name, tensor in self._adapters[name].tensors.items():
                if tensor_name not in self._base_values:
                    self._base_values[tensor_name] = targets[tensor_name].detach().clone()
                targets[tensor_name].copy_(tensor.to(targets[tensor_name].dtype))
        self._active = name

    def deactivate(self, model: nn.Module) -> None:
        """Put back the base value of every tensor an adapter replaced."""
        self._restore(model)
        self._active = None

    def _restore(self, model: nn.Module) -> None:
        targets = tensors_by_name(model)
        with torch.no_grad():
            for name, value in self._base_values.items():
                targets[name].copy_(value)

    def _drop_bank_with(self, name: str) -> None:
        if self._bank is not None and name in self._bank.names:
            bank = self.pop_bank()
            assert bank is not None
            bank.remove()

    def base_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Every parameter and buffer by name as it is with no adapter loaded."""
        current = {name: t.detach() for name, t in tensors_by_name(model).items()}
        return current | self._base_values

    # ------------------------------------------------------------ mixed-batch adapters
    @property
    def bank(self) -> AdapterBank | None:
        """The bank of adapters for mixed batches, if one is loaded (and not removed)."""
        return self._bank if self._bank is not None and self._bank.loaded else None

    def set_bank(self, bank: AdapterBank) -> None:
        self._bank = bank

    def pop_bank(self) -> AdapterBank | None:
        """Forget the bank and return it (the caller removes it from the layers)."""
        bank, self._bank = self._bank, None
        return bank


def model_state(model: nn.Module) -> ModelState:
    """``model``'s ``ModelState``, created empty on first use."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    if not isinstance(state, ModelState):
        state = ModelState()
        model.__dict__[STATE_ATTRIBUTE] = state
    return state


def existing_state(model: nn.Module) -> ModelState | None:
    """``model``'s ``ModelState`` if it has one (reading never adds one)."""
    state = model.__dict__.get(STATE_ATTRIBUTE)
    return state if isinstance(state, ModelState) else None
