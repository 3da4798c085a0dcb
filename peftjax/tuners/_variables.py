"""Variable types that make freezing a filter: what trains is a type, not a flag.

``LoraParam`` subclasses ``nnx.LoRAParam`` (itself an ``nnx.Param``), so
``nnx.Optimizer(model, tx, wrt=TRAINABLE)`` trains adapters only. Beware the trap flax documents:
a filter on ``nnx.Param`` alone also catches adapters; use ``FROZEN`` for the base.
"""

from __future__ import annotations

from flax import nnx


class LoraParam(nnx.LoRAParam):
    """A LoRA factor, DoRA magnitude or other adapter weight."""


class TrainableParam(nnx.Param):
    """A base weight that trains with the adapters (``bias="all"``/``"lora_only"``, ``modules_to_save``)."""


TRAINABLE = nnx.Any(LoraParam, TrainableParam)
FROZEN = nnx.All(nnx.Param, nnx.Not(TRAINABLE))
