"""Putting OFT into an NNX model: PEFT's targets, each layer's block count, then the rotations.

The layer math is in ``_layer.py``; the PEFT file layout is each layer's ``peft_layout``, read
and written by the base tuner's one state-dict walk. :func:`fix_fan_in_fan_out` serves BOFT too;
the injection itself is the base tuner's ``inject_each_layer``.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
from flax import nnx

from peftjax.config import OFTConfig, PeftConfig
from peftjax.tuners.base import inject_each_layer
from peftjax.tuners.oft._layer import OFTLayer, OFTSpec, oft_class_for


def fix_fan_in_fan_out(config: PeftConfig) -> PeftConfig:
    """PEFT resets ``fan_in_fan_out=True`` to ``False`` for ``nn.Linear`` targets, with this warning."""
    if not config.fan_in_fan_out:
        return config
    warnings.warn(
        "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.",
        stacklevel=3,
    )
    return dataclasses.replace(config, fan_in_fan_out=False)


def adjust_oft_parameters(in_features: int, params: int) -> int:
    """PEFT's nearest divisor of ``in_features`` to ``params`` (ties go to the lower one)."""
    if params < in_features:
        higher = params
        while higher <= in_features and in_features % higher != 0:
            higher += 1
    else:
        return in_features
    lower = params
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (params - lower) <= (higher - params) else higher


def layer_spec(config: OFTConfig, in_features: int) -> OFTSpec:
    """One layer's block count and size from ``r`` or ``oft_block_size``, adjusted as PEFT does."""
    r, size = config.r, config.oft_block_size
    if r == 0:
        if in_features % size != 0 or size > in_features:
            old, size = size, adjust_oft_parameters(in_features, size)
            warnings.warn(f"Invalid `oft_block_size` ({old})! Adjusted `oft_block_size` to ({size}).", stacklevel=3)
        r = in_features // size
    else:
        if in_features % r != 0 or r > in_features:
            old, r = r, adjust_oft_parameters(in_features, r)
            warnings.warn(f"Invalid `r` ({old})! Adjusted `r` to ({r}).", stacklevel=3)
        size = in_features // r
    return OFTSpec(
        r=r, block_size=size, block_share=config.block_share, coft=config.coft, eps=config.eps,
        use_cayley_neumann=config.use_cayley_neumann, num_cayley_neumann_terms=config.num_cayley_neumann_terms,
        module_dropout=config.module_dropout,
    )


def rotated_features(module: nnx.Module) -> int:
    """The size OFT rotates: a linear layer's input, an embedding's width."""
    if isinstance(module, nnx.Embed):
        return module.embedding.get_value().shape[1]
    return module.kernel.get_value().shape[0]


def inject_oft(
    model: nnx.Module, config: OFTConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> OFTConfig:
    """Adds OFT adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (not GPT-2's ``Conv1D``, which PEFT's
        OFT rejects) or ``nnx.Embed``.
      config: the OFT settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the weights are stored under (``oft_R/<name>``).
      key: the init key for ``init_weights=False`` (a fixed default keeps it deterministic).

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` reset).

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest names are listed).
      TypeError: a target is not a supported layer (``peftjax.tuners.base.check_linear_targets``).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_oft(model, peftjax.OFTConfig(oft_block_size=8, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.oft_R["default"].shape  # doctest: +SKIP
    (4, 28)
    """
    config = fix_fan_in_fan_out(config)  # resolve_config leaves the field alone: fixed here, PEFT's warning
    return inject_each_layer(
        model, config, adapter_name=adapter_name, key=key, layer_type=OFTLayer, method="OFT", embed=True,
        class_for=oft_class_for, prepare=lambda config, name, module: layer_spec(config, rotated_features(module)),
        add=lambda module, spec, key: module.add_oft(adapter_name, spec, key, config.init_weights))
