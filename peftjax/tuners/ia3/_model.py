"""Putting (IA)³ into an NNX model: PEFT's default targets and feedforward modules, then the vectors.

The layer math is in ``_layer.py``; the PEFT file layout is each layer's ``peft_layout``, read
and written by the base tuner's one state-dict walk.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
from flax import nnx

from peftjax.config import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    IA3Config,
    is_feedforward_module,
    resolve_target_modules,
)
from peftjax.tuners.base import (
    add_saved_copy,
    find_targets,
    match_modules_to_save,
    model_type,
    resolve_config,
    stores_in_out,
    validate_adapter_name,
)
from peftjax.tuners.ia3._layer import IA3Layer, IA3Spec, ia3_class_for


def _resolve_ia3_config(model: nnx.Module, config: IA3Config) -> IA3Config:
    # PEFT fills target_modules and feedforward_modules from the model type independently
    type_name = model_type(model) or ""
    default_ff = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(type_name)
    targets = config.target_modules
    if config.feedforward_modules is None and isinstance(targets, tuple) and default_ff is not None:
        extra = sorted(set(default_ff) - set(targets))
        if extra:
            # PEFT accepts this, then saves an adapter_config.json that it refuses to load again
            raise ValueError(
                f"feedforward_modules is None, so it would be PEFT's default for model_type {type_name!r}, "
                f"{sorted(default_ff)}; but {extra} are not in target_modules={list(targets)}, and a config whose "
                "feedforward_modules is not a subset of target_modules cannot be loaded (by PEFT either). Pass "
                "feedforward_modules explicitly: the targeted modules whose input is scaled, or [] for none."
            )
    if config.target_modules is None or config.feedforward_modules is None:
        config = resolve_target_modules(config, type_name)
    return resolve_config(model, config)


def inject_ia3(
    model: nnx.Module, config: IA3Config, *, adapter_name: str = "default", key: jax.Array | None = None
) -> IA3Config:
    """Adds IA³ adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; the targeted layers must be ``nnx.Linear`` (GPT-2's ``Conv1D``
        included).
      config: the IA³ settings. ``target_modules=None`` / ``feedforward_modules=None`` use PEFT's
        default for the model type; a module is feedforward by PEFT's rule
        (:func:`peftjax.config.is_feedforward_module`: a list entry matches any name ending with
        it). ``modules_to_save`` (and the task head for ``SEQ_CLS``) get trainable copies.
      adapter_name: the name under which the vectors are stored (``ia3_l/<name>``).
      key: the init key for ``init_ia3_weights=False`` (a fixed default keeps it deterministic).

    Returns:
      The resolved config (defaults filled in, task heads added, ``fan_in_fan_out`` set as PEFT
      sets it).

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest names are listed), the model
        type has no default, or ``feedforward_modules`` is not a subset of ``target_modules``.
      TypeError: a target is not a linear layer, or already carries another method's adapter.
      NotImplementedError: a target is an ``nnx.Conv`` / ``LinearGeneral`` / ``Einsum`` (PEFT
        supports IA³ on convolutions; peftjax does not yet).

    >>> import peftjax, jax.numpy as jnp  # doctest: +SKIP
    >>> config = inject_ia3(model, peftjax.IA3Config(target_modules=["k_proj", "down_proj"],
    ...                                              feedforward_modules=["down_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.k_proj.ia3_l["default"].shape  # doctest: +SKIP
    (32,)
    """
    validate_adapter_name(adapter_name)
    config = _resolve_ia3_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules, targets = find_targets(model, config, IA3Layer, "IA³")
    in_out = [n for n in targets if stores_in_out(modules[n])]
    if in_out and not config.fan_in_fan_out:
        warnings.warn(
            f"{in_out[0]} stores its weight as (fan_in, fan_out) like HF's Conv1D; setting fan_in_fan_out=True "
            "as PEFT does",
            stacklevel=2,
        )
        config = dataclasses.replace(config, fan_in_fan_out=True)
    elif not in_out and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target modules are linear layers stored (fan_out, fan_in); "
            "setting fan_in_fan_out to False as PEFT does",
            stacklevel=2,
        )
        config = dataclasses.replace(config, fan_in_fan_out=False)
    for i, name in enumerate(targets):
        module = modules[name]
        module.__class__ = ia3_class_for(module)
        module._adapter_setup(name)
        spec = IA3Spec(is_feedforward=is_feedforward_module(config, name))
        module.add_ia3(adapter_name, spec, jax.random.fold_in(key, i), config.init_ia3_weights)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
