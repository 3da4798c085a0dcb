"""Putting Super-Tuning into an NNX model: PEFT's targets, each weight's support, then the values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import SupertuningConfig
from peftjax.nn._init import kaiming_uniform
from peftjax.tuners.base import adapter_layers, inject_each_layer
from peftjax.tuners.supertuning._layer import (
    SupertuningLayer,
    SupertuningSpec,
    magnitude_support,
    supertuning_class_for,
)


def inject_supertuning(
    model: nnx.Module, config: SupertuningConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> SupertuningConfig:
    """Adds Super-Tuning adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        Super-Tuning rejects).
      config: the settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the values are stored under.
      key: the init key (the Supra LoRA's ``A`` in torch's Kaiming-uniform range; with
        ``init_weights=False`` the values ``N(0, 1)`` and ``B`` drawn too).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; the sparsity leaves a layer no entry; another
        Super-Tuning adapter on the model differs in ``save_precomputed_indices`` (PEFT's rule); the
        adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_supertuning(model, peftjax.SupertuningConfig(sparsity=0.9, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.supertuning_values["default"].shape  # doctest: +SKIP
    (102,)
    """
    for layer in adapter_layers(model, SupertuningLayer).values():
        kept = {layer.spec(n).save_indices for n in layer.adapter_names()} | {config.save_precomputed_indices}
        if len(kept) > 1:
            raise ValueError("Super-Tuning indices must be saved for all adapters or none, but got multiple different "
                             f"values: {sorted(kept)}")
    scaling = config.lora_alpha / config.r if config.r else 0.0
    spec = SupertuningSpec(r=config.r or 0, scaling=scaling, dropout=config.lora_dropout,
                           save_indices=config.save_precomputed_indices)

    def prepare(config, name, module):
        return magnitude_support(module.kernel.get_value(), config.sparsity, config.select_top)

    def add(module, indices, key):
        n_in, n_out = module.kernel.get_value().shape
        kv, ka, kb = jax.random.split(key, 3)
        n = indices.shape[0]
        values = jnp.zeros((n,), jnp.float32) if config.init_weights else jax.random.normal(kv, (n,), jnp.float32)
        a = b = None
        if spec.r:
            a = kaiming_uniform(ka, (spec.r, n_in))
            b = jnp.zeros((n_out, spec.r), jnp.float32) if config.init_weights else kaiming_uniform(kb, (n_out, spec.r))
        module.add_supertuning(adapter_name, spec, values, indices, a, b)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=SupertuningLayer,
                             method="Super-Tuning", class_for=supertuning_class_for, prepare=prepare, add=add)
