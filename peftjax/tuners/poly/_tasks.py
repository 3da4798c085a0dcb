"""Each row's task for Poly's layers: ``model(..., task_ids=...)`` on the model itself.

PEFT's ``PolyModel`` hands ``task_ids`` to every Poly layer through forward pre-hooks. Here the
model's class gains a ``__call__`` (and ``generate``) taking ``task_ids``, which it makes current
(:func:`current_task_ids`) while the model runs, so the layers read it; under ``jit`` and
``scan_layers`` the ids are traced values of the same call. The swapped class keeps the model's
name and shows its signature (the ``Trainer`` reads it), and ``unload`` restores the class.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._generation import rows_per_input
from peftjax.tuners.base import CallValue, ModelMixin, mixin_subclass, original_class, with_base_signature

_TASK_IDS = CallValue("peftjax_task_ids")


def current_task_ids():
    """The running call's ``task_ids`` (``None`` outside a call that passed some)."""
    return _TASK_IDS.get()


class TaskIdsModel(ModelMixin):
    """Mixin for a model whose layers read the rows' tasks: ``__call__`` takes ``task_ids``."""

    def __call__(self, *args, task_ids=None, **kwargs):
        if task_ids is None and hasattr(self, "peft_generate_task_ids"):  # inside generate's compiled loop
            task_ids = self.peft_generate_task_ids.get_value()
        with _TASK_IDS.during(task_ids):
            return self._peftjax_base.__call__(self, *args, **kwargs)


class TaskIdsGenerationModel(TaskIdsModel):
    """:class:`TaskIdsModel` for a generating model: ``generate`` takes ``task_ids`` too.

    The ids ride in the model's state for the call (``peft_generate_task_ids``), so the compiled
    generation loop reads them as data: one compilation serves every assignment of tasks.
    """

    def generate(self, *args, task_ids=None, **kwargs):
        if task_ids is None:
            return self._peftjax_base.generate(self, *args, **kwargs)
        from peftjax.tuners.poly._layer import check_task_ids

        ids = check_task_ids(task_ids, self)
        if ids.ndim == 1 and ids.shape[0] > 1:  # a row's id for each of its beams or returned sequences
            ids = np.repeat(ids, rows_per_input(self, kwargs))
        self.peft_generate_task_ids = nnx.Variable(jnp.asarray(ids, jnp.int32))
        try:
            return self._peftjax_base.generate(self, *args, **kwargs)
        finally:
            del self.peft_generate_task_ids


def take_task_ids(model, method: str) -> None:
    """Makes ``model`` take ``task_ids`` (once; the class keeps its name and call signature).

    Raises:
      TypeError: the model's class was already swapped by another method (prompt learning), whose
        adapters PEFT does not combine with ``method``'s either.
    """
    if isinstance(model, TaskIdsModel):
        return
    if original_class(model) is not type(model):
        raise TypeError(f"{method} cannot be added to {type(model).__name__}: the model carries another method's "
                        f"model-level adapter (prompt learning)")
    mixin = TaskIdsGenerationModel if hasattr(type(model), "generate") else TaskIdsModel
    model.__class__ = with_base_signature(mixin_subclass(type(model), mixin, ""), TaskIdsModel.__call__)
