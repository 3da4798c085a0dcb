"""Putting RoAd into an NNX model: PEFT's targets and group check, then each layer's angles and scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import RoadConfig, match_modules
from peftjax.tuners.base import (
    add_saved_copy,
    match_modules_to_save,
    model_type,
    named_modules,
    resolve_config,
    validate_adapter_name,
)
from peftjax.tuners.oft._model import check_targets
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
    validate_adapter_name(adapter_name)
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    check_targets(modules, targets, RoadLayer, "RoAd", embed=False)
    for name in targets:  # every refusal comes before the first change to the model
        if isinstance(modules[name], RoadLayer) and adapter_name in modules[name].adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
        n_out = modules[name].kernel.get_value().shape[1]
        if n_out % config.group_size:
            raise ValueError(f"{name}: The out_features of the base layer ({n_out}) must be divisible by group_size "
                             f"({config.group_size}) when using RoadLayer.")
    spec = RoadSpec(variant=config.variant, group_size=config.group_size)
    for i, name in enumerate(targets):
        module = modules[name]
        size = parameter_size(config.variant, module.kernel.get_value().shape[1])
        if config.init_weights:
            theta, alpha = jnp.zeros((size,), jnp.float32), jnp.ones((size,), jnp.float32)
        else:
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            theta = 0.5 * jax.random.normal(k1, (size,), jnp.float32)
            alpha = 1.0 + 0.5 * jax.random.normal(k2, (size,), jnp.float32)
        module.__class__ = road_class_for(module)
        module._adapter_setup(name)
        module.add_road(adapter_name, spec, theta, alpha)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
