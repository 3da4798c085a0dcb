"""Putting Poly into an NNX model: PEFT's targets, the skills' pairs and routers, the model's ``task_ids``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import PolyConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.poly._layer import PolyLayer, PolySpec, poly_class_for
from peftjax.tuners.poly._tasks import take_task_ids


def initial_weights(key: jax.Array, config: PolyConfig, n_in: int, n_out: int):
    """``(A, B, router logits)`` as PEFT initialises them: each skill's and split's ``A`` in torch's
    ``kaiming_uniform_(a=sqrt(5))`` range for its ``[r, in / splits]`` weight (``+-1/sqrt(in / splits)``),
    ``B`` zero (``init_weights=False``: ``+-1/sqrt(r)``), the logits uniform in ``+-1e-3``."""
    q, s, r = config.n_splits, config.n_skills, config.r
    ka, kb, kr = jax.random.split(key, 3)
    bound = 1.0 / math.sqrt(n_in // q)
    a = jax.random.uniform(ka, (q, s, n_in // q, r), jnp.float32, -bound, bound)
    if config.init_weights:
        b = jnp.zeros((q, s, r, n_out // q), jnp.float32)
    else:
        b = jax.random.uniform(kb, (q, s, r, n_out // q), jnp.float32, -1.0 / math.sqrt(r), 1.0 / math.sqrt(r))
    logits = jax.random.uniform(kr, (config.n_tasks, q * s), jnp.float32, -1e-3, 1e-3)
    return a, b, logits


def inject_poly(
    model: nnx.Module, config: PolyConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> PolyConfig:
    """Adds Poly adapter ``adapter_name`` to every layer ``config`` targets, in place, and makes the
    model take ``task_ids`` (``model(..., task_ids=...)``, one task per row).

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        Poly rejects).
      config: the Poly settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the weights are stored under.
      key: the init key.

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; ``n_splits`` does not divide a layer's input
        or output size (naming the layer); the adapter already exists on a layer.
      TypeError: a target is not a supported layer; the model carries a prompt-learning adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_poly(model, peftjax.PolyConfig(r=4, n_tasks=3, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model(input_ids=ids, task_ids=[0, 2])  # doctest: +SKIP
    """
    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        for what, size in (("input", n_in), ("output", n_out)):
            if size % config.n_splits:
                raise ValueError(f"{name}: n_splits={config.n_splits} does not divide the layer's {what} size {size}")
        return PolySpec(r=config.r, n_tasks=config.n_tasks, n_skills=config.n_skills, n_splits=config.n_splits)

    def add(module, spec, key):
        n_in, n_out = module.kernel.get_value().shape
        module.add_poly(adapter_name, spec, *initial_weights(key, config, n_in, n_out))

    take_task_ids(model, "Poly")
    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=PolyLayer, method="Poly",
                             class_for=poly_class_for, prepare=prepare, add=add)
