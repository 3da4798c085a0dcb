"""Variable types that make freezing a filter: what trains is a type, not a flag.

``AdapterParam`` is the type of every method's adapter weight (LoRA factors, IA³ vectors,
bottleneck MLPs, prompt encoders); ``LoraParam`` is LoRA's own subtype, so ``wrt=LoraParam``
picks LoRA weights only. Both are ``nnx.LoRAParam`` (itself an ``nnx.Param``), so
``nnx.Optimizer(model, tx, wrt=TRAINABLE)`` trains adapters only. Beware the trap flax documents:
a filter on ``nnx.Param`` alone also catches adapters; use ``FROZEN`` for the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class AdapterParam(nnx.LoRAParam):
    """An adapter weight of any method: trains, and is saved in the adapter file."""


class ProjectedAdapterParam(AdapterParam):
    """An adapter weight kept inside a set (projected gradient descent): every peftjax train step
    replaces it by ``projection(value)`` after the optimizer's update (:func:`project_adapters`).

    ``projection`` (metadata) is a hashable, value-comparable callable from array to array, such
    as a frozen dataclass: it is part of the state's tree structure, which ``jit`` compares.
    """


def project_adapters(state):
    """``state`` (a model's state, or ``peftjax.split``'s trainable part) with every
    :class:`ProjectedAdapterParam` replaced by its projection; other leaves as they were.

    peftjax's train steps call it after each update. A hand-written step (``nnx.Optimizer``, or
    optax on ``split``'s state) calls it the same way to train such a method as PEFT does:

    >>> trainable = optax.apply_updates(trainable, updates)  # doctest: +SKIP
    >>> trainable = peftjax.project_adapters(trainable)  # doctest: +SKIP
    """
    def project(v):
        if isinstance(v, ProjectedAdapterParam):
            return v.replace(v.projection(v.get_value()))
        return v

    return jax.tree.map(project, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class LoraParam(AdapterParam):
    """A LoRA factor, DoRA magnitude or LoRA bias."""


class TrainableParam(nnx.Param):
    """A base weight that trains with the adapters (``bias="all"``/``"lora_only"``, ``modules_to_save``)."""


class FrozenAdapterParam(nnx.Param):
    """An adapter weight loaded for inference (``is_trainable=False``): frozen like the base."""


TRAINABLE = nnx.Any(AdapterParam, TrainableParam)
FROZEN = nnx.All(nnx.Param, nnx.Not(TRAINABLE))


def fresh_copy(x: jax.Array) -> jax.Array:
    """A new buffer with ``x``'s contents and placement, for a trainable copy that a train step may
    donate. A transfer, not a program: ``jnp.copy`` compiles one per shape. An array spread over
    several processes (multi-host) cannot be transferred that way and is copied by ``jnp.copy``."""
    if getattr(x, "is_fully_addressable", True):
        return jax.device_put(x, may_alias=False)
    return jnp.copy(x)
