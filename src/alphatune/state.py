"""What alphatune keeps on a model besides its modules and tensors, declared in one place.

One ``ModelState`` per model (``model_state``), under one attribute, holding:

- ``head``: the record of an LM head replaced by ``quantize_lm_head`` or loaded so (what a saved
  base writes as "head"); changed only through ``alphatune.lm_head.set_replaced_head``;
- the adapter registry: the base value of every tensor that ``load_adapter`` replaced (so that
  unloading or loading another adapter restores it; ``replace``, ``restore``, ``base_state``) and
  the bank of adapters loaded side by side for mixed batches (``alphatune.mixed``; ``bank``,
  ``set_bank``, ``pop_bank``).

Nothing else sets attributes on a model; ``copy.deepcopy(model)`` copies the state with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


class ModelState:
    """alphatune's state on one model (see the module docstring); change it through its methods."""

    def __init__(self) -> None:
        self._head: ReplacedHead | None = None
        self._base_values: dict[str, Tensor] = {}  # tensor name -> its value without an adapter
        self._bank: AdapterBank | None = None

    # ------------------------------------------------------------ the LM head
    @property
    def head(self) -> ReplacedHead | None:
        return self._head

    def set_head(self, record: ReplacedHead | None) -> None:
        self._head = record

    # ------------------------------------------------------------ a loaded adapter
    def restore(self, model: nn.Module) -> None:
        """Put back the base value of every tensor an adapter replaced."""
        targets = tensors_by_name(model)
        with torch.no_grad():
            for name, value in self._base_values.items():
                targets[name].copy_(value)

    def replace(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        """Restore the base values, then copy ``tensors`` into the model's tensors of the same
        names, keeping the base value of each the first time it is replaced."""
        targets = tensors_by_name(model)
        self.restore(model)
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name not in self._base_values:
                    self._base_values[name] = targets[name].detach().clone()
                targets[name].copy_(tensor.to(targets[name].dtype))

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
