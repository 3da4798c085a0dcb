"""Putting RoAd into an NNX model: PEFT's targets and group check, then each layer's angles and scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import RoadConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.road._layer import RoadLayer, RoadSpec, parameter_size, road_class_for


def inject_road(
    model: nnx.Module, config: RoadConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> RoadConfig:
    """Adds RoAd adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        RoAd rejects).
      config: the RoAd settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the parameters are stored under.
      key: the init key of ``init_weights=False`` (angles ``N(0, 0.5)``, scales ``N(1, 0.5)``).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; a layer's output is not divisible by
        ``group_size`` (PEFT's check, naming the layer); the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_road(model, peftjax.RoadConfig(group_size=8, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.road_theta["default"].shape  # doctest: +SKIP
    (16,)
    """
    spec = RoadSpec(variant=config.variant, group_size=config.group_size)

    def prepare(config, name, module):
        n_out = module.kernel.get_value().shape[1]
        if n_out % config.group_size:
            raise ValueError(f"{name}: The out_features of the base layer ({n_out}) must be divisible by group_size "
                             f"({config.group_size}) when using RoadLayer.")
        return parameter_size(config.variant, n_out)

    def add(module, size, key):
        if config.init_weights:
            theta, alpha = jnp.zeros((size,), jnp.float32), jnp.ones((size,), jnp.float32)
        else:
            k1, k2 = jax.random.split(key)
            theta = 0.5 * jax.random.normal(k1, (size,), jnp.float32)
            alpha = 1.0 + 0.5 * jax.random.normal(k2, (size,), jnp.float32)
        module.add_road(adapter_name, spec, theta, alpha)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=RoadLayer, method="RoAd",
                             class_for=road_class_for, prepare=prepare, add=add)
