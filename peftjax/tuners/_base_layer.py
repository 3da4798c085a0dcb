"""The contract every adapter-carrying layer keeps, whatever the method (LoRA, IA³, ...).

A method's layer is a mixin applied to the user's own layer class (``mixin_subclass``); the
model-wide operations (activate, disable, merge, unmerge, delete, unload) only use this interface.
"""

from __future__ import annotations

import abc

from flax import nnx


class AdapterLayer(abc.ABC):
    """A layer that holds named adapters beside its frozen weights."""

    # attributes the mixin adds to the layer; ``remove_adapter_state`` deletes them
    adapter_state_attrs: tuple[str, ...] = ()

    @abc.abstractmethod
    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter on this layer."""

    @abc.abstractmethod
    def set_active_adapters(self, names: tuple[str, ...]) -> None:
        """Activates the given adapters (names this layer lacks are ignored)."""

    @abc.abstractmethod
    def set_adapters_disabled(self, disabled: bool) -> None:
        """Bypasses every adapter while ``disabled``."""

    @abc.abstractmethod
    def active_adapter_names(self) -> tuple[str, ...]:
        """The active adapters."""

    @abc.abstractmethod
    def merged_adapter_names(self) -> tuple[str, ...]:
        """The adapters folded into the base weights, in merge order."""

    @abc.abstractmethod
    def merge_adapter(self, name: str) -> None:
        """Folds the adapter into the base weights."""

    @abc.abstractmethod
    def unmerge_adapter(self, name: str) -> None:
        """Undoes :meth:`merge_adapter`."""

    @abc.abstractmethod
    def delete_adapter(self, name: str) -> None:
        """Removes the adapter's weights."""

    @abc.abstractmethod
    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        """The ``{adapter name: variable}`` containers of this layer's adapter weights."""

    def remove_adapter_state(self) -> None:
        for attr in self.adapter_state_attrs:
            if hasattr(self, attr):
                delattr(self, attr)
