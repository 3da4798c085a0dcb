"""transformers' activation names (``ACT2FN``) as JAX functions: one table for the bundled models'
configs (``hidden_act``, ``activation_function``, ``feed_forward_proj``) and for methods that
name an activation (PEANuT's ``act_fn``).

Each is the function transformers' class of that name computes; the tanh-approximated GELUs
(``gelu_new``, ``gelu_fast``, ``gelu_accurate``, ``gelu_pytorch_tanh``, ``gelu_python_tanh``) are one
formula written differently. Names whose module has weights (``prelu``, ``xielu``) are absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from peftjax.nn._functional import gelu


def _tanh_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _laplace(x: jax.Array, mu: float = 0.707107, sigma: float = 0.282095) -> jax.Array:
    return 0.5 * (1.0 + jax.lax.erf((x - mu) / (sigma * math.sqrt(2.0))))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_python": gelu,
    "gelu_10": lambda x: jnp.clip(gelu(x), -10.0, 10.0),
    "gelu_new": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu_accurate": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "gelu_python_tanh": _tanh_gelu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "hardswish": jax.nn.hard_swish,
    "laplace": _laplace,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "linear": lambda x: x,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str, what: str) -> Callable[[jax.Array], jax.Array]:
    """The function transformers calls ``name``.

    Args:
      name: an ``ACT2FN`` key.
      what: the config field it came from, for the error.

    Raises:
      ValueError: ``name`` is not in the table (names the field and the supported names).

    >>> float(activation("relu2", "act_fn")(jnp.array(-3.0)))
    0.0
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"{what} {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
