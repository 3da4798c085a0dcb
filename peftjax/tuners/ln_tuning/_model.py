"""Putting LN tuning into an NNX model: PEFT's default norm targets, then a trained copy of each."""

from __future__ import annotations

import jax
from flax import nnx

from peftjax.config import LNTuningConfig, match_modules
from peftjax.tuners.base import (
    AdapterLayer,
    add_saved_copy,
    match_modules_to_save,
    model_type,
    named_modules,
    original_class,
    resolve_config,
    validate_adapter_name,
)
from peftjax.tuners.ln_tuning._layer import LNTuningLayer, ln_tuning_class_for


def inject_ln_tuning(
    model: nnx.Module, config: LNTuningConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> LNTuningConfig:
    """Adds LN-tuning adapter ``adapter_name`` to every norm layer ``config`` targets, in place.

    Args:
      model: any NNX module.
      config: the targets; ``None`` uses PEFT's default for the model type (BERT has none: name
        the norms, e.g. ``["LayerNorm"]``).
      adapter_name: the name under which the copies are stored.
      key: unused (the copies start equal to the layer); accepted like every method's.

    Returns:
      The resolved config.

    Raises:
      ValueError: nothing matches ``target_modules``, or the model type has no default.
      TypeError: a target is not an ``nnx.LayerNorm`` / ``nnx.RMSNorm`` (PEFT copies any
        module, e.g. ``embed_tokens``; peftjax only norm layers), or carries another method's
        adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_ln_tuning(model, peftjax.LNTuningConfig(target_modules=["norm"]))  # doctest: +SKIP
    >>> model.model.norm.ln_tuning_scale["default"].shape  # doctest: +SKIP
    (32,)
    """
    validate_adapter_name(adapter_name)
    config = resolve_config(model, config)
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    bad = [n for n in targets if ln_tuning_class_for(modules[n]) is None]
    if bad:
        listed = ", ".join(
            f"{n} ({original_class(modules[n]).__name__} with a {type(modules[n]).__name__} adapter)"
            if isinstance(modules[n], AdapterLayer) else f"{n} ({type(modules[n]).__name__})"
            for n in bad[:10]
        )
        raise TypeError(f"LN tuning cannot adapt {listed}; supported layers: nnx.LayerNorm, nnx.RMSNorm")
    for name in targets:
        if isinstance(modules[name], LNTuningLayer) and adapter_name in modules[name].adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
    for name in targets:
        module = modules[name]
        module.__class__ = ln_tuning_class_for(module)
        module._adapter_setup(name)
        module.add_ln_tuning(adapter_name)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
