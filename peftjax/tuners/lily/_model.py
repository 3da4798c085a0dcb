"""Putting LiLy into an NNX model: per-layer routers, then ``A`` and ``B`` shared as PEFT shares them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import LilyConfig
from peftjax.nn._init import kaiming_uniform
from peftjax.tuners.base import AdapterParam, inject_each_layer, modules_in_definition_order, named_modules
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
        across layers); a target is quantized.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_lily(model, peftjax.LilyConfig(r=4, stride_A=2, target_modules=["q_proj"]))  # doctest: +SKIP
    """
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            "LiLy on a model built with scan_layers=True is not implemented (its A and B are shared across "
            "layers); load the model with scan_layers=False")
    spec = LilySpec(r=config.r, num_b=config.num_B, scaling=float(config.scaling))
    order: dict[str, int] = {}

    def prepare(config, name, module):
        if not order:
            order.update({n: i for i, n in enumerate(modules_in_definition_order(model))})
        n_in, n_out = module.kernel.get_value().shape
        return n_in, n_out

    targets: dict[str, tuple] = {}

    def add(module, shape, layer_key):
        n_in, n_out = shape
        ka, kb, kr = jax.random.split(layer_key, 3)
        a = AdapterParam(kaiming_uniform(ka, (config.r, n_in)))
        b_value = kaiming_uniform(kb, (config.num_B * config.r, n_out)) if not config.init_weights else jnp.zeros(
            (config.num_B * config.r, n_out), jnp.float32)
        module.add_lily(adapter_name, spec, a, AdapterParam(b_value), kaiming_uniform(kr, (config.num_B, config.r)))
        targets[module.adapter_path] = shape

    config = inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=LilyLayer,
                               method="LiLy", class_for=lily_class_for, prepare=prepare, add=add)
    groups: dict[tuple, list[str]] = {}
    for name in sorted(targets, key=order.__getitem__):
        groups.setdefault((_group(name, config.target_modules), targets[name]), []).append(name)
    modules = named_modules(model)
    for names in groups.values():
        first = modules[names[0]]
        for i, name in enumerate(names):
            layer = modules[name]
            if i:
                layer.lily_B[adapter_name] = first.lily_B[adapter_name]
            leader = modules[names[(i // config.stride_A) * config.stride_A]]
            if leader is not layer:
                layer.lily_A[adapter_name] = leader.lily_A[adapter_name]
    return config
