"""Putting BOFT into an NNX model: PEFT's targets and per-layer checks, then the butterfly factors.

The layer math is in ``_layer.py``; the file layout is each layer's ``peft_layout``.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from peftjax.config import BOFTConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.boft._layer import BOFTLayer, BOFTSpec, boft_class_for
from peftjax.tuners.oft._model import fix_fan_in_fan_out


def layer_spec(config: BOFTConfig, in_features: int, path: str) -> BOFTSpec:
    """One layer's factors, block count and size, with PEFT's checks (and messages, prefixed by the path).

    Raises:
      ValueError: the sizes do not divide ``in_features`` or do not fit the butterfly factors.
    """
    size, num, nbf = config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor - 1

    def fail(message: str):
        raise ValueError(f"{path}: {message}")

    if size == 0:
        if in_features % num != 0:
            fail(f"in_features ({in_features}) must be divisible by boft_block_num ({num})!")
        if nbf != 0:
            if nbf > int(math.log2(num)):
                fail(f"Invalid combination of boft_n_butterfly_factor ({nbf + 1}) and boft_block_num ({num})!")
            if num % (2**nbf) != 0:
                fail(f"boft_block_num ({num}) must be a multiple of 2 raised to the power of "
                     f"boft_n_butterfly_factor ({nbf + 1})!")
        size = in_features // num
    else:
        if in_features % size != 0:
            fail(f"in_features ({in_features}) must be divisible by boft_block_size ({size})!")
        if nbf != 0 and (in_features < size * 2**nbf or in_features % (size * 2**nbf) != 0):
            fail(f"Invalid combination of in_features ({in_features}), boft_n_butterfly_factor ({nbf + 1}) and "
                 f"boft_block_size ({size})!")
        num = in_features // size
    if nbf != 0:
        if num % 2 != 0:
            fail(f"boft_block_num ({num}) must be an even number!")
        if size % 2 != 0:
            fail(f"boft_block_size ({size}) must be an even number!")
    return BOFTSpec(n_factors=nbf + 1, block_num=num, block_size=size, dropout=config.boft_dropout)


def inject_boft(
    model: nnx.Module, config: BOFTConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> BOFTConfig:
    """Adds BOFT adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D`` nor
        embeddings, which PEFT's BOFT rejects).
      config: the BOFT settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the weights are stored under (``boft_R/<name>``, ``boft_s/<name>``).
      key: the init key for ``init_weights=False``.

    Returns:
      The resolved config.

    Raises:
      ValueError: nothing matches ``target_modules``, or a layer's size does not fit the blocks.
      TypeError: a target is not a supported layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_boft(model, peftjax.BOFTConfig(boft_block_size=4, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.boft_R["default"].shape  # doctest: +SKIP
    (1, 8, 4, 4)
    """
    config = fix_fan_in_fan_out(config)  # resolve_config leaves the field alone: fixed here, PEFT's warning
    return inject_each_layer(
        model, config, adapter_name=adapter_name, key=key, layer_type=BOFTLayer, method="BOFT",
        class_for=boft_class_for,
        prepare=lambda config, name, module: layer_spec(config, module.kernel.get_value().shape[0], name),
        add=lambda module, spec, key: module.add_boft(adapter_name, spec, key, config.init_weights))
