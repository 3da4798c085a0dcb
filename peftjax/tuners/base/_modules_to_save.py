"""``modules_to_save``: modules that train a full copy per adapter (task heads, embeddings).

A saved module keeps its frozen original and gains ``modules_to_save[<adapter name>]``, a trainable
copy that replaces it while that adapter is active; PEFT's ``ModulesToSaveWrapper``. The module may
be a single layer (BERT's ``classifier``) or hold layers of its own (RoBERTa's ``classifier`` head,
``dense`` and ``out_proj``): every weight inside the copy trains.
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
    for owner, attr, var in module_params(copy):
        # a real copy: the train step donates trainable buffers, which must not be the frozen original's
        set_param(owner, attr, TrainableParam(fresh_copy(var.get_value())))
    module.modules_to_save[adapter_name] = copy
    if not module.saved_active:
        module.saved_active = (adapter_name,)


def module_params(module: nnx.Module) -> list[tuple[object, str | int, nnx.Param]]:
    """Every ``nnx.Param`` in ``module``'s tree (the module's own and its sub-modules'), as
    ``(owner, attribute, variable)`` in a fixed order: two copies of one module list their
    weights alike."""
    nodes = dict(nnx.iter_graph(module))
    return [(nodes[tuple(path[:-1])], path[-1], node) for path, node in nodes.items()
            if isinstance(node, nnx.Param) and path]


def set_param(owner, attr: str | int, variable: nnx.Param) -> None:
    """Replaces the variable ``owner.attr`` (``owner[attr]`` in an ``nnx.List`` or ``nnx.Dict``)."""
    if isinstance(attr, int) or not hasattr(owner, attr):
        owner[attr] = variable
    else:
        setattr(owner, attr, variable)
