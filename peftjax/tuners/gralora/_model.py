"""Putting GraLoRA into an NNX model: PEFT's targets and shape checks, then the factors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import GraloraConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.gralora._layer import GraloraLayer, GraloraSpec, gralora_class_for


def _kaiming(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """torch's ``kaiming_uniform_(a=sqrt(5))`` on a tensor whose fan-in is ``fan_in``: ``+-1 / sqrt(fan_in)``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def inject_gralora(
    model: nnx.Module, config: GraloraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> GraloraConfig:
    """Adds GraLoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets are ``nnx.Linear`` layers, GPT-2's ``Conv1D`` included.
      config: the GraLoRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the factors are stored under.
      key: the init key: each ``A_n`` (and the hybrid ``A``) in torch's ``kaiming_uniform_`` range of
        its ``[r, in/k]`` torch tensor; ``B`` zero, or drawn too with ``init_weights=False``.

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; ``gralora_k`` does not divide a layer's input or
        output size (PEFT's message, naming the layer); the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_gralora(model, peftjax.GraloraConfig(r=8, gralora_k=2, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.gralora_A["default"].shape  # doctest: +SKIP
    (2, 16, 8)
    """
    k, r, hybrid = config.gralora_k, config.r, config.hybrid_r
    spec = GraloraSpec(r=r, k=k, hybrid_r=hybrid, scaling=config.alpha / (r + hybrid), dropout=config.gralora_dropout)

    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        if n_in % k != 0:
            raise ValueError(f"{name}: in_features should be divisible by gralora_k, but got {n_in} and {k}")
        if n_out % k != 0:
            raise ValueError(f"{name}: out_features should be divisible by gralora_k, but got {n_out} and {k}")

    def add(module, _, key):
        n_in, n_out = module.kernel.get_value().shape
        ka, kb, kga, kgb = jax.random.split(key, 4)
        a = _kaiming(ka, (k, n_in // k, r), n_in // k)
        b = jnp.zeros((k, r, n_out // k), jnp.float32) if config.init_weights else _kaiming(kb, (k, r, n_out // k), r)
        general = (None, None)
        if hybrid:
            b_general = jnp.zeros((hybrid, n_out), jnp.float32) if config.init_weights else \
                _kaiming(kgb, (hybrid, n_out), hybrid)
            general = (_kaiming(kga, (n_in, hybrid), n_in), b_general)
        module.add_gralora(adapter_name, spec, a, b, *general)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=GraloraLayer,
                             method="GraLoRA", class_for=gralora_class_for, prepare=prepare, add=add, conv1d=True)
