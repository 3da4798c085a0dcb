"""Putting LiLy into an NNX model: per-layer routers, then ``A`` and ``B`` shared as PEFT shares them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import LilyConfig
from peftjax.nn._init import kaiming_uniform
from peftjax.tuners.base import AdapterParam, adapter_layers, inject_each_layer, modules_in_definition_order
from peftjax.tuners.lily._layer import LilyLayer, LilySpec, lily_class_for


def _group(name: str, target_modules) -> str | None:
    """PEFT's group key: the target a layer matched (the last listed suffix it ends with)."""
    if isinstance(target_modules, str):
        return target_modules
    matched = None
    for suffix in target_modules:
        if name.endswith(suffix):
            matched = suffix
    return matched


def inject_lily(
    model: nnx.Module, config: LilyConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> LilyConfig:
    """Adds LiLy adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Layers are grouped by the target they matched and their weight shape, in the order the model
    assigned its modules (transformers' order for the bundled models, as PEFT walks them): within a
    group, blocks of ``stride_A`` consecutive layers share the first one's ``A``, and every layer
    shares the first one's ``B``.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        LiLy rejects).
      config: the LiLy settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the weights are stored under.
      key: the init key (``A`` and the routers in torch's Kaiming-uniform range; ``B`` too with
        ``init_weights=False``, else zero).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer.
      TypeError: a target is not a supported layer.
      NotImplementedError: the model stacks its layers (``scan_layers=True``: the sharing runs
        across layers).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_lily(model, peftjax.LilyConfig(r=4, stride_A=2, target_modules=["q_proj"]))  # doctest: +SKIP
    """
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            "LiLy on a model built with scan_layers=True is not implemented (its A and B are shared across "
            "layers); load the model with scan_layers=False")
    spec = LilySpec(r=config.r, num_b=config.num_B, scaling=float(config.scaling))

    def add(module, _, layer_key):
        n_in, n_out = module.kernel.get_value().shape
        ka, kb, kr = jax.random.split(layer_key, 3)
        b_shape = (config.num_B * config.r, n_out)
        b = kaiming_uniform(kb, b_shape) if not config.init_weights else jnp.zeros(b_shape, jnp.float32)
        module.add_lily(adapter_name, spec, AdapterParam(kaiming_uniform(ka, (config.r, n_in))), AdapterParam(b),
                        kaiming_uniform(kr, (config.num_B, config.r)))

    config = inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=LilyLayer,
                               method="LiLy", class_for=lily_class_for, prepare=lambda *_: None, add=add)
    layers = adapter_layers(model, LilyLayer, adapter_name)
    groups: dict[tuple, list[LilyLayer]] = {}
    for name in (n for n in modules_in_definition_order(model) if n in layers):
        group = (_group(name, config.target_modules), layers[name].kernel.get_value().shape)
        groups.setdefault(group, []).append(layers[name])
    for members in groups.values():  # B: the group's first; A: its stride block's first
        for i, layer in enumerate(members):
            layer.lily_B[adapter_name] = members[0].lily_B[adapter_name]
            layer.lily_A[adapter_name] = members[i - i % config.stride_A].lily_A[adapter_name]
    return config
