"""Putting HRA into an NNX model: PEFT's targets, then each layer's reflection vectors.

The layer math is in ``_layer.py``; the PEFT file layout is each layer's ``peft_layout``, read
and written by the base tuner's one state-dict walk.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import HRAConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.hra._layer import HRALayer, HRASpec, hra_class_for


def initial_vectors(key: jax.Array, n_in: int, r: int, symmetric: bool) -> jax.Array:
    """``hra_u [n_in, r]`` as PEFT initialises it (torch's ``kaiming_uniform_(a=sqrt(5))``, whose
    bound on an ``[n, m]`` tensor is ``1 / sqrt(m)``); ``symmetric``: ``r / 2`` columns drawn and
    each repeated twice, so that every reflection is undone by the next and ``H`` is the identity."""
    m = r // 2 if symmetric else r
    drawn = jax.random.uniform(key, (n_in, m), jnp.float32, -1.0 / math.sqrt(m), 1.0 / math.sqrt(m))
    return jnp.repeat(drawn, 2, axis=1) if symmetric else drawn


def inject_hra(
    model: nnx.Module, config: HRAConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> HRAConfig:
    """Adds HRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        HRA rejects).
      config: the HRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the vectors are stored under (``hra_u/<name>``).
      key: the init key (a fixed default keeps it deterministic).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer.
      TypeError: a target is not a supported layer (``peftjax.tuners.base.check_linear_targets``).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_hra(model, peftjax.HRAConfig(r=4, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.hra_u["default"].shape  # doctest: +SKIP
    (32, 4)
    """
    symmetric = config.init_weights and config.r % 2 == 0
    if config.init_weights and not symmetric:
        warnings.warn("The symmetric initialization can NOT be performed when r is odd!", stacklevel=2)
    spec = HRASpec(r=config.r, apply_GS=config.apply_GS)

    def add(module, _, key):
        n_in = module.kernel.get_value().shape[0]
        module.add_hra(adapter_name, spec, initial_vectors(key, n_in, config.r, symmetric))

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=HRALayer, method="HRA",
                             class_for=hra_class_for, prepare=lambda *_: None, add=add)
