"""Putting MiSS into an NNX model: PEFT's targets and shape checks, then each layer's block.

The layer math is in ``_layer.py``; the PEFT file layout is each layer's ``peft_layout``, read
and written by the base tuner's one state-dict walk.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import MissConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.miss._layer import MissLayer, MissSpec, miss_class_for


def layer_spec(config: MissConfig, name: str, n_in: int, n_out: int) -> tuple[MissSpec, tuple[int, ...]]:
    """One layer's settings and ``miss_block`` shape, with PEFT's checks (its messages, and the layer).

    Raises:
      ValueError: ``r > in``; bat with ``in`` or ``out`` not divisible by ``r``; mini with ``out``
        not divisible by ``mini_r``.
    """
    r, init = config.r, config.init_weights
    if r > n_in:
        raise ValueError(f"{name}: `r` ({r}) must be less than or equal to in_features ({n_in})")
    if init == "bat":
        if n_in % r or n_out % r:
            raise ValueError(f"{name}: The weight matrix must be fully divisible into [r, r] blocks "
                             f"(in_features {n_in}, out_features {n_out}, r {r}).")
        return MissSpec(r=r, variant="bat"), (n_out // r, r, r)
    if init == "mini":
        if n_out % config.mini_r:
            raise ValueError(f"{name}: mini_r is divided along the out_features dimension; out_features "
                             f"{n_out} is not divisible by mini_r {config.mini_r}")
        return MissSpec(r=r, variant="mini", mini_r=config.mini_r, dropout=config.miss_dropout), (r, config.mini_r)
    return MissSpec(r=r, dropout=config.miss_dropout), (r, n_out)


def inject_miss(
    model: nnx.Module, config: MissConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> MissConfig:
    """Adds MiSS adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        MiSS rejects).
      config: the MiSS settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the blocks are stored under (``miss_block/<name>``).
      key: the init key of ``init_weights=False`` (``kaiming_uniform_(a=sqrt(5))``'s range, as
        PEFT draws it); the other variants start at zero.

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; a layer's shape does not fit (see
        :func:`layer_spec`); the adapter already exists on a layer.
      TypeError: a target is not a supported layer (``peftjax.tuners.base.check_linear_targets``).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_miss(model, peftjax.MissConfig(r=8, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.miss_block["default"].shape  # doctest: +SKIP
    (8, 32)
    """
    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        return layer_spec(config, name, n_in, n_out)

    def add(module, prepared, key):
        spec, shape = prepared
        if config.init_weights is False:  # torch's kaiming_uniform_ bound on [r, out]: 1 / sqrt(out)
            bound = 1.0 / math.sqrt(shape[1])
            value = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        else:
            value = jnp.zeros(shape, jnp.float32)
        module.add_miss(adapter_name, spec, value)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=MissLayer, method="MiSS",
                             class_for=miss_class_for, prepare=prepare, add=add)
