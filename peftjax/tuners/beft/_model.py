"""Putting BEFT into an NNX model: PEFT's targets (the value projections by default), then each bias."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import BeftConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.beft._layer import BeftLayer, beft_class_for


def inject_beft(
    model: nnx.Module, config: BeftConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> BeftConfig:
    """Adds BEFT adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        BEFT rejects); bitsandbytes-quantized linears too, as PEFT takes them.
      config: the BEFT settings; ``target_modules=None`` uses PEFT's BEFT default for the model type.
      adapter_name: the name the biases are stored under.
      key: the init key of ``init_weights=False`` (``N(0, 1)``, torch's ``randn``).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_beft(model, peftjax.BeftConfig(target_modules=["v_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.v_proj.beft_bias["default"].shape  # doctest: +SKIP
    (1, 16)
    """
    def prepare(config, name, module):
        return module.kernel.get_value().shape[1]

    def add(module, n_out, key):
        if config.init_weights:
            bias = jnp.zeros((1, n_out), jnp.float32)
        else:
            bias = jax.random.normal(key, (1, n_out), jnp.float32)
        module.add_beft(adapter_name, bias)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=BeftLayer, method="BEFT",
                             class_for=beft_class_for, prepare=prepare, add=add)
