"""Putting HiRA into an NNX model: PEFT's targets and per-module ranks, then the modulating pairs."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import HiraConfig
from peftjax.tuners.base import adding_from_file, inject_each_layer
from peftjax.tuners.hira._layer import HiraLayer, HiraSpec, hira_class_for


def initial_pair(key: jax.Array, init: bool | str, r: int, n_in: int, n_out: int, embed: bool):
    """``(A [r, in], B [out, r])`` as PEFT initialises them (an embedding's ``in`` is its rows,
    ``out`` its width): ``False`` both standard normal; otherwise ``B`` zero and ``A`` in torch's
    ``kaiming_uniform_(a=sqrt(5))`` range (``"gaussian"``: ``N(0, 1/r^2)``), or, on an embedding,
    ``A`` zero and ``B`` standard normal."""
    ka, kb = jax.random.split(key)
    if init is False:
        return jax.random.normal(ka, (r, n_in)), jax.random.normal(kb, (n_out, r))
    if embed:
        return jnp.zeros((r, n_in), jnp.float32), jax.random.normal(kb, (n_out, r))
    if init == "gaussian":
        a = jax.random.normal(ka, (r, n_in)) / r
    else:
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(ka, (r, n_in), jnp.float32, -bound, bound)
    return a, jnp.zeros((n_out, r), jnp.float32)


def inject_hira(
    model: nnx.Module, config: HiraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> HiraConfig:
    """Adds HiRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets are ``nnx.Linear`` (GPT-2's ``Conv1D`` included) and
        ``nnx.Embed`` layers.
      config: the HiRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the pairs are stored under.
      key: the init key.

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer.
      NotImplementedError: ``rank_pattern`` on a new adapter (PEFT 0.22.0 makes every layer at
        ``r`` whatever it says, so the file would not load there); a file's config may carry one,
        and its layers are at ``r``, as PEFT made them.
      TypeError: a target is not a supported layer (convolutions: not implemented here).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_hira(model, peftjax.HiraConfig(r=4, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.hira_A["default"].shape  # doctest: +SKIP
    (4, 32)
    """
    if config.rank_pattern and not adding_from_file():
        raise NotImplementedError(
            f"HiraConfig(rank_pattern={config.rank_pattern!r}): PEFT 0.22.0's HiRA makes every layer at r="
            f"{config.r} whatever rank_pattern says, so an adapter made here with other ranks would not load in "
            "PEFT; give the layers one r (or add adapters of other ranks separately)")

    def prepare(config, name, module):
        return config.r  # PEFT's dispatch_default reads config.r, not the rank_pattern it looked up

    def add(module, r, key):
        embed = isinstance(module, nnx.Embed)
        n_in, n_out = (module.embedding if embed else module.kernel).get_value().shape
        a, b = initial_pair(key, config.init_weights, r, n_in, n_out, embed)
        module.add_hira(adapter_name, HiraSpec(r=r, dropout=config.hira_dropout), a, b)

    resolved = inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=HiraLayer,
                                 method="HiRA", class_for=hira_class_for, prepare=prepare, add=add, embed=True,
                                 conv1d=True)
    # PEFT's HiRA warns about fan_in_fan_out but hands each layer its own value, leaving the config's
    return dataclasses.replace(resolved, fan_in_fan_out=config.fan_in_fan_out)
