"""Putting SHiRA into an NNX model: PEFT's targets and size check, then each layer's mask and entries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import ShiraConfig
from peftjax.nn._torch_rng import RANDPERM_32BIT_LIMIT, randperm_head
from peftjax.tuners.base import adding_from_file, inject_each_layer
from peftjax.tuners.shira._layer import ShiraLayer, ShiraSpec, shira_class_for


# the seed of a fresh ``torch.Generator()`` (``c10::default_rng_seed_val``), which PEFT's random
# mask uses when ``random_seed`` is None
TORCH_DEFAULT_SEED = 67280421310721


def random_mask(seed: int, n_in: int, n_out: int, count: int) -> np.ndarray:
    """PEFT's ``random_mask``: the first ``count`` entries of ``torch.randperm(in * out)`` drawn by a
    generator seeded with ``seed``, as ``[2, count]`` int32 positions (row, column) of the
    ``[out, in]`` weight in row-major order (``torch.where`` of the mask). Exactly PEFT's for
    ``in * out < 2**32 / 20`` (torch's 32-bit path, ``peftjax.nn._torch_rng``); a larger layer
    gets positions drawn by NumPy from ``seed`` instead, a mask of the same kind but not PEFT's."""
    n = n_in * n_out
    if n < RANDPERM_32BIT_LIMIT:
        flat = np.sort(randperm_head(seed, n, count))
    else:
        flat = np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))
    return np.stack([flat // n_in, flat % n_in]).astype(np.int32)


def inject_shira(
    model: nnx.Module, config: ShiraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> ShiraConfig:
    """Adds SHiRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        SHiRA rejects).
      config: the SHiRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the entries and positions are stored under.
      key: draws the entries with ``init_weights=False``. The masks are PEFT's: every layer of a
        shape gets the same one, from ``random_seed`` or a fresh torch generator's seed.

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; ``r (in + out)`` exceeds a layer's ``in * out``
        (naming the layer); the adapter already exists on a layer.
      NotImplementedError: a ``mask_type`` other than ``"random"`` for a new adapter (its mask
        function is the PEFT user's own; files with such masks load, their positions included).
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_shira(model, peftjax.ShiraConfig(r=2, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.shira_indices["default"].shape  # doctest: +SKIP
    (2, 128)
    """
    from_file = adding_from_file()
    if config.mask_type != "random" and not from_file:
        raise NotImplementedError(
            f"ShiraConfig(mask_type={config.mask_type!r}): peftjax makes 'random' masks only (PEFT's other mask "
            "types are a mask_fn of the user's); an adapter file with such a mask loads, its shira_indices included")

    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        count = config.r * (n_in + n_out)
        if count > n_in * n_out:
            raise ValueError(f"{name}: The set rank {config.r} results in more shira params than the total number of "
                             f"params in the base layer {n_in * n_out} and this is not allowed.")
        return count

    def add(module, count, key):
        n_in, n_out = module.kernel.get_value().shape
        if from_file:  # the file's positions replace these
            indices = np.zeros((2, count), np.int32)
        else:
            seed = config.random_seed if config.random_seed is not None else TORCH_DEFAULT_SEED
            indices = random_mask(seed, n_in, n_out, count)
        values = jnp.zeros((count,), jnp.float32) if config.init_weights else jax.random.normal(key, (count,))
        module.add_shira(adapter_name, ShiraSpec(r=config.r), values, indices)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=ShiraLayer, method="SHiRA",
                             class_for=shira_class_for, prepare=prepare, add=add)
