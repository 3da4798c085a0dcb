"""Putting DEFT into an NNX model: PEFT's targets, then each layer's ``P`` and ``R`` (``R`` from the weight)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import DeftConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.deft._layer import DeftLayer, DeftSpec, deft_class_for, deft_projection


def inject_deft(
    model: nnx.Module, config: DeftConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> DeftConfig:
    """Adds DEFT adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (GPT-2's ``Conv1D`` too, as in PEFT).
      config: the DEFT settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the matrices are stored under.
      key: the init key (``P ~ N(0, 0.02)``; with ``init_weights=False`` also
        ``R ~ N(0, 0.02 init_scale)``, else ``R = right^T W / s``: the identity).

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT
      leaves it).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_deft(model, peftjax.DeftConfig(r=4, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.deft_R["default"].shape  # doctest: +SKIP
    (4, 32)
    """
    def prepare(config, name, module):
        n_out = module.kernel.get_value().shape[1]
        r = min(config.r, n_out)  # P_proj has rank at most out_features (PEFT's cap)
        scaling = config.alpha / r if config.alpha else 1.0
        return DeftSpec(r=r, decomposition=config.decomposition_method, scaling=scaling, para=config.para,
                        dropout=config.deft_dropout)

    def add(module, spec, key):
        kernel = module.kernel.get_value().astype(jnp.float32)  # [in, out] = W^T
        n_in, n_out = kernel.shape
        kp, kr = jax.random.split(key)
        p = 0.02 * jax.random.normal(kp, (n_out, spec.r), jnp.float32)
        if spec.para:
            r = None
        elif config.init_weights:  # s R = right^T W: the update starts at exactly zero
            _, right = deft_projection(p, spec.decomposition)
            r = (kernel @ right).T / spec.scaling
        else:
            r = 0.02 * config.init_scale * jax.random.normal(kr, (spec.r, n_in), jnp.float32)
        module.add_deft(adapter_name, spec, p, r)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=DeftLayer,
                             method="DEFT", class_for=deft_class_for, prepare=prepare, add=add, conv1d=True)
