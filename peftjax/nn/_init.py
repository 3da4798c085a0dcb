"""Initialisations PEFT's torch layers use, drawn with JAX keys (the ranges, not torch's numbers)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """PyTorch's ``nn.init.kaiming_uniform_(w, a=math.sqrt(5))`` on a torch-layout ``shape`` (an
    ``nn.Linear`` weight is ``[out, in]``), float32.

    The bound is ``1 / sqrt(fan_in)``, ``fan_in = shape[1] * prod(shape[2:])``.

    >>> float(jnp.abs(kaiming_uniform(jax.random.key(0), (4, 16))).max()) <= 0.25
    True
    """
    fan_in = shape[1] * math.prod(shape[2:])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def torch_linear(key: jax.Array, fan_in: int, fan_out: int) -> tuple[jax.Array, jax.Array]:
    """``nn.Linear(fan_in, fan_out)``'s default init: the weight ``[out, in]`` as
    :func:`kaiming_uniform`, the bias U(-1/sqrt(in), 1/sqrt(in)), float32 (two keys split from ``key``)."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return kaiming_uniform(kw, (fan_out, fan_in)), jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)
