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
