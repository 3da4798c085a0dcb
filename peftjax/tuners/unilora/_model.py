"""Putting Uni-LoRA into an NNX model: one shared vector, every layer's positions assigned in the
model's module order, PEFT's file layout."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import UniLoraConfig
from peftjax.tuners.base import (
    AdapterParam,
    adapter_layers,
    inject_each_layer,
    modules_in_definition_order,
    with_model_tensors,
)
from peftjax.tuners.unilora._layer import UniLoraLayer, UniLoraSpec, unilora_class_for, unilora_index

THETA_KEY = "base_model.unilora_theta_d"  # PEFT: ``base_model.unilora_theta_d.<adapter>`` in memory


def _assign_positions(model: nnx.Module, adapter_name: str, config: UniLoraConfig) -> None:
    """PEFT's ``_assign_unilora_indices_and_scales``: the layers' ``A`` then ``B`` entries, layer by
    layer in module order, take consecutive chunks of one balanced shuffle; each entry is scaled by
    ``1 / sqrt(uses of its position)``."""
    layers = adapter_layers(model, UniLoraLayer, adapter_name)
    ordered = [layers[n] for n in modules_in_definition_order(model) if n in layers]
    shapes = [(m.unilora_indices_A[adapter_name].get_value().shape, m.unilora_indices_B[adapter_name].get_value().shape)
              for m in ordered]
    indices = unilora_index(sum(int(np.prod(a)) + int(np.prod(b)) for a, b in shapes), config.theta_d_length,
                            config.proj_seed)
    counts = np.bincount(indices, minlength=config.theta_d_length)
    inv_sqrt = np.where(counts > 0, 1.0 / np.sqrt(np.maximum(counts, 1)), 0.0).astype(np.float32)
    start = 0
    for module, (shape_a, shape_b) in zip(ordered, shapes):
        parts = []
        for shape in (shape_a, shape_b):
            n = int(np.prod(shape))
            parts.append(indices[start:start + n].reshape(shape))
            start += n
        module.set_positions(adapter_name, parts[0], parts[1], inv_sqrt[parts[0]], inv_sqrt[parts[1]])


def inject_unilora(
    model: nnx.Module, config: UniLoraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> UniLoraConfig:
    """Adds Uni-LoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets are ``nnx.Linear`` layers (GPT-2's ``Conv1D`` included). The
        positions follow the order the model assigned its modules in (transformers' order for the
        bundled models), as PEFT follows ``model.modules()``.
      config: the Uni-LoRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the vector and positions are stored under.
      key: draws ``theta_d`` (uniform in ``+-init_theta_d_bound``, or ``N(0, 1)`` with
        ``init_weights=False``).

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists.
      TypeError: a target is not a linear layer, or carries another method's adapter.
      NotImplementedError: the model stacks its layers (``scan_layers=True``: the positions run
        across layers, which a stacked layer shares).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_unilora(model, peftjax.UniLoraConfig(r=4, theta_d_length=64, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.unilora_indices_A["default"].shape  # doctest: +SKIP
    (4, 32)
    """
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            "Uni-LoRA on a model built with scan_layers=True is not implemented (its positions run across the "
            "layers, one vector for all); load the model with scan_layers=False")
    key = jax.random.key(0) if key is None else key
    d = config.theta_d_length
    if config.init_weights:
        theta = jax.random.uniform(key, (d,), jnp.float32, -config.init_theta_d_bound, config.init_theta_d_bound)
    else:
        theta = jax.random.normal(key, (d,), jnp.float32)
    shared = AdapterParam(theta)
    spec = UniLoraSpec(r=config.r, dropout=float(config.unilora_dropout), save_indices=config.save_indices)

    def add(module, _, layer_key):
        n_in, n_out = module.kernel.get_value().shape
        module.add_unilora(adapter_name, spec, shared, n_in, n_out)

    config = inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=UniLoraLayer,
                               method="Uni-LoRA", class_for=unilora_class_for, prepare=lambda *_: None, add=add,
                               conv1d=True)
    _assign_positions(model, adapter_name, config)
    return config


def _theta(model: nnx.Module, adapter_name: str) -> dict:
    layer = next(iter(adapter_layers(model, UniLoraLayer, adapter_name).values()))
    return {THETA_KEY: (layer.unilora_theta_d[adapter_name], "the shared vector theta_d", "[theta_d_length]")}


# PEFT's on-disk dict: the vector once, and (``save_indices``) every layer's positions and scales;
# loading keeps the positions assigned from ``proj_seed`` where the file has none, as PEFT does
unilora_state_dict, load_unilora_state_dict = with_model_tensors(UniLoraLayer, _theta)
