"""``modules_to_save``: layers that train a full copy per adapter (task heads, embeddings).

A saved layer keeps its frozen original and gains ``modules_to_save[<adapter name>]``, a trainable
copy that replaces it while that adapter is active; PEFT's ``ModulesToSaveWrapper``.
"""

from __future__ import annotations

import abc

from flax import nnx

from peftjax.tuners.base._layer import mixin_subclass, original_class
from peftjax.tuners.base._rows import pick_rows, rows_of
from peftjax.tuners.base._variables import TrainableParam, fresh_copy


class SavedModule(abc.ABC):
    """Mixin for a ``modules_to_save`` layer: each adapter trains its own full copy."""

    supports_adapter_rows = True

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.modules_to_save)

    def __call__(self, *args, **kwargs):
        mixed = rows_of(self)
        if mixed is not None and not self.saved_disabled:  # each row takes its adapter's copy
            rows, names = mixed
            base = self._peftjax_base.__call__(self, *args, **kwargs)
            copies = [self.modules_to_save[n](*args, **kwargs) if n in self.modules_to_save else base for n in names]
            return pick_rows(rows, copies, base)
        for name in self.saved_active:
            if name in self.modules_to_save and not self.saved_disabled:
                return self.modules_to_save[name](*args, **kwargs)
        return self._peftjax_base.__call__(self, *args, **kwargs)


def add_saved_copy(module: nnx.Module, adapter_name: str) -> None:
    """Makes ``module`` a ``modules_to_save`` layer with a trainable copy for ``adapter_name``."""
    if not isinstance(module, SavedModule):
        copy = nnx.clone(module)
        module.__class__ = mixin_subclass(type(module), SavedModule, "Saved")
        module.modules_to_save = nnx.Dict()
        module.saved_active = ()
        module.saved_disabled = False
    else:
        copy = nnx.clone(module)
        copy.__class__ = original_class(module)
        for attr in ("modules_to_save", "saved_active", "saved_disabled"):
            delattr(copy, attr)
    for attr, var in list(vars(copy).items()):
        if isinstance(var, nnx.Param):
            # a real copy: the train step donates trainable buffers, which must not be the frozen original's
            setattr(copy, attr, TrainableParam(fresh_copy(var.get_value())))
    module.modules_to_save[adapter_name] = copy
    if not module.saved_active:
        module.saved_active = (adapter_name,)


