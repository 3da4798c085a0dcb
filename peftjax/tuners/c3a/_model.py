"""Putting C3A into an NNX model: PEFT's targets and per-module block sizes, then the kernels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import C3AConfig, get_pattern_key
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.c3a._layer import C3ALayer, C3ASpec, c3a_class_for


def initial_kernel(key: jax.Array, init: bool | str, n_in: int, n_out: int, b: int) -> jax.Array:
    """``c3a_kernel [out / b, in / b, b]`` as PEFT initialises it: zeros for ``True``; uniform in
    ``+-sqrt(6 / (in + out))`` for ``"xavier_uniform"`` and ``False``, ``+-sqrt(1 / in)`` for
    ``"kaiming_uniform"``; standard normal for ``"gaussian"`` (the layer's sizes, not the kernel's)."""
    shape = (n_out // b, n_in // b, b)
    if init is True:
        return jnp.zeros(shape, jnp.float32)
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32)
    bound = math.sqrt(1.0 / n_in) if init == "kaiming_uniform" else math.sqrt(6.0 / (n_in + n_out))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def inject_c3a(
    model: nnx.Module, config: C3AConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> C3AConfig:
    """Adds C3A adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        C3A rejects).
      config: the C3A settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the kernels are stored under.
      key: the init key (unused with ``init_weights=True``, the zero start).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; a block size does not divide a layer's input
        or output size (PEFT's message, naming the layer); the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_c3a(model, peftjax.C3AConfig(block_size=16, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.c3a_kernel["default"].shape  # doctest: +SKIP
    (2, 2, 16)
    """
    def prepare(config, name, module):
        b = config.block_size_pattern.get(get_pattern_key(config.block_size_pattern, name), config.block_size)
        n_in, n_out = module.kernel.get_value().shape
        if n_in % b != 0:
            raise ValueError(f"{name}: The block size should be a factor of the input size. However, the input size "
                             f"is {n_in} and the block size is {b}")
        if n_out % b != 0:
            raise ValueError(f"{name}: The block size should be a factor of the output size. However, the output "
                             f"size is {n_out} and the block size is {b}")
        return b

    def add(module, b, key):
        n_in, n_out = module.kernel.get_value().shape
        module.add_c3a(adapter_name, C3ASpec(block_size=b), initial_kernel(key, config.init_weights, n_in, n_out, b))

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=C3ALayer, method="C3A",
                             class_for=c3a_class_for, prepare=prepare, add=add)
