"""Putting PEANuT into an NNX model: PEFT's targets, then each layer's network, drawn as PEFT draws it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import PeanutConfig
from peftjax.nn._activations import activation
from peftjax.nn._init import kaiming_uniform
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.peanut._layer import PeanutLayer, PeanutSpec, peanut_class_for


def inject_peanut(
    model: nnx.Module, config: PeanutConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> PeanutConfig:
    """Adds PEANuT adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        PEANuT rejects).
      config: the PEANuT settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the network is stored under.
      key: the init key (every weight in torch's Kaiming-uniform range; ``B`` zero unless
        ``init_weights=False``).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; ``act_fn`` is not an activation peftjax has;
        the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_peanut(model, peftjax.PeanutConfig(r=4, depth=1, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.peanut_encoders["0"]["default"].shape  # doctest: +SKIP
    (4, 4)
    """
    activation(config.act_fn, "PeanutConfig.act_fn")  # refused before anything changes
    spec = PeanutSpec(r=config.r, depth=config.depth, act_fn=config.act_fn, scaling=float(config.scaling))

    def prepare(config, name, module):
        return module.kernel.get_value().shape[1]

    def add(module, n_out, key):
        r, depth = spec.r, spec.depth
        keys = jax.random.split(key, 2 * depth + 2)
        a = kaiming_uniform(keys[0], (r, n_out))
        encoders = [kaiming_uniform(keys[1 + i], (r, r)) for i in range(depth)]
        decoders = [kaiming_uniform(keys[1 + depth + i], (r, r)) for i in range(depth)]
        b = jnp.zeros((n_out, r), jnp.float32) if config.init_weights else kaiming_uniform(keys[-1], (n_out, r))
        module.add_peanut(adapter_name, spec, a, encoders, decoders, b)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=PeanutLayer,
                             method="PEANuT", class_for=peanut_class_for, prepare=prepare, add=add)
