"""Putting DeLoRA into an NNX model: PEFT's targets and per-module rank and lambda, then the factors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import DeloraConfig, get_pattern_key
from peftjax.nn._init import kaiming_uniform
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.delora._layer import DeloraLayer, DeloraSpec, delora_class_for


def inject_delora(
    model: nnx.Module, config: DeloraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> DeloraConfig:
    """Adds DeLoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        DeLoRA rejects).
      config: the DeLoRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the factors are stored under.
      key: the init key (``A`` in torch's ``kaiming_uniform_`` range; ``B`` too with
        ``init_weights=False``, else zero).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_delora(model, peftjax.DeloraConfig(r=4, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.delora_A["default"].shape  # doctest: +SKIP
    (4, 32)
    """
    def prepare(config, name, module):
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern, name), config.r)
        lam = config.lambda_pattern.get(get_pattern_key(config.lambda_pattern, name), config.delora_lambda)
        return r, float(lam)

    def add(module, prepared, key):
        r, lam = prepared
        kernel = module.kernel.get_value()  # [in, out]: torch's column norms are the kernel's row norms
        n_in, n_out = kernel.shape
        ka, kb = jax.random.split(key)
        a = kaiming_uniform(ka, (r, n_in))
        b = jnp.zeros((n_out, r), jnp.float32) if config.init_weights else kaiming_uniform(kb, (n_out, r))
        w_norm = jnp.linalg.norm(kernel.astype(jnp.float32), axis=1)
        module.add_delora(adapter_name, DeloraSpec(r=r, dropout=config.module_dropout), a, b, lam, w_norm)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=DeloraLayer,
                             method="DeLoRA", class_for=delora_class_for, prepare=prepare, add=add)
