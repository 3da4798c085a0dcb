"""Putting GLoRA into an NNX model: PEFT's targets, then each layer's five terms, drawn as PEFT draws them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import GloraConfig
from peftjax.nn._init import kaiming_uniform
from peftjax.tuners.base import inject_each_layer, layer_bias
from peftjax.tuners.glora._layer import TERMS, GloraLayer, GloraSpec, glora_class_for


def _term_values(term: str, kind: str, n_in: int, n_out: int, r: int, init: bool, key: jax.Array) -> dict:
    """One term's tensors (torch layouts): PEFT's ``GloraLoraPath`` / ``VectorPath`` / ``ScalarPath`` / ``EmptyPath``."""
    rows, cols = (n_in, 1) if term == "C" else (n_out, n_in)  # C maps the inputs to one column
    k1, k2 = jax.random.split(key)
    if kind == "lora":  # Xu always drawn, Xd zero unless init_weights=False
        return {"Xd": kaiming_uniform(k1, (rows, r)) if not init else jnp.zeros((rows, r), jnp.float32),
                "Xu": kaiming_uniform(k2, (r, cols))}
    if kind == "vector":  # a column ([features, 1]) for A, B, C; a row ([features]) for D, E
        shape = (n_out,) if term in "DE" else (rows, 1)
        drawn = kaiming_uniform(k1, (1, n_out)).reshape(shape) if term in "DE" else kaiming_uniform(k1, shape)
        return {"X": jnp.zeros(shape, jnp.float32) if init else drawn}
    if kind == "constant":
        return {"X": jnp.zeros((1,), jnp.float32) if init else 0.02 * jax.random.normal(k1, (1,), jnp.float32)}
    return {"zeros": jnp.zeros((n_out,) if term in "DE" else (rows, cols), jnp.float32)}


def inject_glora(
    model: nnx.Module, config: GloraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> GloraConfig:
    """Adds GLoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        GLoRA rejects).
      config: the GLoRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the terms are stored under.
      key: the init key (each ``"lora"`` term's ``Xu`` in torch's Kaiming-uniform range; with
        ``init_weights=False`` every trained tensor is drawn).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_glora(model, peftjax.GloraConfig(r=4, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.glora_A_Xd["default"].shape  # doctest: +SKIP
    (32, 4)
    """
    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        has_bias = layer_bias(module) is not None
        kinds = {"A": config.config_A_B, "B": config.config_A_B,
                 "C": config.config_C if has_bias else "none", "D": config.config_D_E if has_bias else "none",
                 "E": config.config_D_E if has_bias else "none"}
        return n_in, n_out, GloraSpec(r=config.r, kinds=tuple(kinds.items()))

    def add(module, prepared, key):
        n_in, n_out, spec = prepared
        values = {}
        for i, t in enumerate(TERMS):
            parts = _term_values(t, spec.kind(t), n_in, n_out, spec.r, config.init_weights, jax.random.fold_in(key, i))
            values.update({f"{t}.{p}": v for p, v in parts.items()})
        module.add_glora(adapter_name, spec, values)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=GloraLayer,
                             method="GLoRA", class_for=glora_class_for, prepare=prepare, add=add)
