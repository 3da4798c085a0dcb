"""Putting OSF into an NNX model: each target's SVD, split at its effective rank."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import OSFConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.osf._layer import OSFLayer, OSFSpec, osf_class_for


def _rank(value, min_dim: int) -> int:
    """PEFT's ``_resolve_rank``: ``None`` is half of ``min_dim``; a float in ``(0, 1]`` that share of
    it; else the int; clipped to ``[0, min_dim]``."""
    if value is None:
        return max(min_dim // 2, 0)
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


def inject_osf(
    model: nnx.Module, config: OSFConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> OSFConfig:
    """Adds OSF adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        OSF skips).
      config: the OSF settings; ``target_modules=None`` means every linear layer but the head.
      adapter_name: the name the factors are stored under.
      key: the init key of ``init_weights=False`` (the trained factors ``N(0, 1)``).

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; a layer's effective rank resolves to 0
        (PEFT's check, naming it); the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_osf(model, peftjax.OSFConfig(effective_rank=8, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.osf_S_low["default"].shape  # doctest: +SKIP
    (24,)
    """
    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        rank = _rank(config.effective_rank, min(n_in, n_out))
        for pattern, value in (config.rank_pattern or {}).items():
            if re.search(pattern, name):
                rank = _rank(value, min(n_in, n_out))
                break
        if rank <= 0:
            raise ValueError(f"{name}: `effective_rank` should be a positive integer value but the value passed is "
                             f"{rank}")
        return rank

    def add(module, rank, key):
        weight = module.kernel.get_value().astype(jnp.float32).T  # torch's [out, in]
        u, s, vt = jnp.linalg.svd(weight, full_matrices=False)
        frozen = {"U_high": u[:, :rank], "V_high": vt[:rank], "U_init": u[:, rank:], "S_init": s[rank:],
                  "V_init": vt[rank:]}
        if config.init_weights:
            trained = {"U_low": u[:, rank:], "S_low": s[rank:], "V_low": vt[rank:]}
        else:
            keys = jax.random.split(key, 3)
            trained = {p: jax.random.normal(k, frozen[p.replace("low", "init")].shape, jnp.float32)
                       for p, k in zip(("U_low", "S_low", "V_low"), keys)}
        module.add_osf(adapter_name, OSFSpec(effective_rank=rank), trained, frozen)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=OSFLayer, method="OSF",
                             class_for=osf_class_for, prepare=prepare, add=add)
