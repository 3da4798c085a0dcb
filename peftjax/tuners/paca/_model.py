"""Putting PaCA into an NNX model: PEFT's targets, then each layer's columns and update."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import PacaConfig, get_pattern_key
from peftjax.nn._keys import fold_in, host_rng
from peftjax.nn._torch_rng import RANDPERM_32BIT_LIMIT, randperm_head
from peftjax.tuners.base import adding_from_file, inject_each_layer
from peftjax.tuners.paca._layer import PacaLayer, PacaSpec, paca_class_for


def layer_seed(random_seed: int, name: str) -> int:
    """PEFT's ``_get_layer_seed``: ``random_seed`` plus the CRC-32 of the layer's name, mod 2**63."""
    return (random_seed + zlib.crc32(name.encode("utf-8"))) % (2**63)


def select_columns(seed: int, n_in: int, r: int) -> np.ndarray:
    """PEFT's selection: ``torch.randperm(n_in)[:r]`` from a generator seeded with ``seed``, sorted
    (exactly torch's for ``n_in < 2**32 / 20``, every real layer)."""
    if n_in >= RANDPERM_32BIT_LIMIT:
        raise NotImplementedError(f"PaCA's column selection on a layer of {n_in} inputs: torch draws 64-bit numbers "
                                  "there, which peftjax does not reproduce")
    return np.sort(randperm_head(seed, n_in, r)).astype(np.int64)


def inject_paca(
    model: nnx.Module, config: PacaConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> PacaConfig:
    """Adds PaCA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        PaCA rejects).
      config: the PaCA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the update and columns are stored under.
      key: draws the columns when ``random_seed`` is ``None`` (each layer's from its share of the
        key) and the update with ``init_weights=False``.

    Returns:
      The resolved config (targets filled in, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules``; ``r`` or a ``paca_indices_pattern`` column
        exceeds a layer's inputs (naming the layer); the adapter already exists on a layer.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_paca(model, peftjax.PacaConfig(r=4, target_modules=["q_proj"], random_seed=0))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.paca_indices["default"].shape  # doctest: +SKIP
    (4,)
    """
    from_file = adding_from_file()
    key_or_default = jax.random.key(0) if key is None else key

    def prepare(config, name, module):
        n_in = module.kernel.get_value().shape[0]
        indices = config.paca_indices_pattern.get(get_pattern_key(config.paca_indices_pattern.keys(), name))
        if indices is None:
            if config.r > n_in:
                raise ValueError(f"{name}: `r` ({config.r}) cannot be larger than in_features ({n_in}) of the base "
                                 "layer.")
            if from_file:  # the file's columns replace these
                return np.arange(config.r, dtype=np.int64)
            if config.random_seed is None:  # from the key and the layer's name, as PEFT's seed mixes them
                rng = host_rng(fold_in(key_or_default, zlib.crc32(name.encode("utf-8"))))
                return np.sort(rng.permutation(n_in)[:config.r]).astype(np.int64)
            return select_columns(layer_seed(config.random_seed, name), n_in, config.r)
        if max(indices) >= n_in:
            raise ValueError(f"{name}: The indices in `paca_indices_pattern` must be smaller than in_features ({n_in}) "
                             f"of the base layer, got {list(indices)}.")
        return np.sort(np.asarray(indices, np.int64))

    def add(module, indices, key):
        n_out = module.kernel.get_value().shape[1]
        shape = (n_out, len(indices))
        delta = jnp.zeros(shape, jnp.float32) if config.init_weights else 0.1 * jax.random.normal(key, shape)
        module.add_paca(adapter_name, PacaSpec(r=len(indices), scaling=config.paca_alpha / config.r), delta, indices)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key_or_default, layer_type=PacaLayer,
                             method="PaCA", class_for=paca_class_for, prepare=prepare, add=add)
