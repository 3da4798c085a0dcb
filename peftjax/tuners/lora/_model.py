"""Putting LoRA into an NNX model: ``inject_lora`` and PEFT's ``fan_in_fan_out`` rule.

The model-wide operations that serve every method (activate, merge, unload, ...) are the base
tuner's (``peftjax.tuners.base``); this file holds what only LoRA does when it injects.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
from flax import nnx

from peftjax.config import LoraConfig, match_modules
from peftjax.tuners.base import (
    AdapterLayer,
    TrainableParam,
    add_saved_copy,
    match_modules_to_save,
    model_type,
    named_modules,
    original_class,
    resolve_config,
    stores_in_out,
    validate_adapter_name,
)
from peftjax.tuners.lora._layer import SUPPORTED_LAYERS, LoraLayer, LoraSpec, lora_class_for
from peftjax.quantization._linear import QuantizedLinear


def lora_layers(model: nnx.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in named_modules(model).items() if isinstance(m, LoraLayer)}


def inject_lora(
    model: nnx.Module, config: LoraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> LoraConfig:
    """Adds adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module built from ``nnx.Linear``/``nnx.Embed`` layers.
      config: the LoRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name under which the weights are stored (``lora_A/<name>``).
      key: the init key (a fixed default keeps ``get_peft_model`` deterministic).

    Returns:
      The resolved config (defaults filled in, ``all-linear`` expanded, task heads added).

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest module names are listed).
      TypeError: a matched module is a layer type LoRA cannot adapt (names path and class).
    """
    validate_adapter_name(adapter_name)
    from peftjax.models._scan import has_stacked_layers, unstacked

    if has_stacked_layers(model):  # scan_layers=True: inject per layer, then stack the adapters too
        with unstacked(model, write=True):
            return inject_lora(model, config, adapter_name=adapter_name, key=key)
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    unsupported = [
        (n, f"{original_class(modules[n]).__name__} with a {type(modules[n]).__name__} adapter"
         if isinstance(modules[n], AdapterLayer) else type(modules[n]).__name__)
        for n in targets
        if lora_class_for(modules[n]) is None
    ]
    if unsupported:
        listed = ", ".join(f"{n} ({c})" for n, c in unsupported[:10])
        raise TypeError(f"LoRA cannot adapt {listed}; supported layers: {', '.join(SUPPORTED_LAYERS)}")
    config = _settle_fan_in_fan_out(config, [modules[n] for n in targets])
    for name in targets:  # every refusal comes before the first change to the model
        lora_class_for(modules[name]).check_lora(
            modules[name], name, use_dora=bool(config.use_dora), lora_bias=bool(config.lora_bias),
            init=config.init_lora_weights,
        )
    for i, name in enumerate(targets):
        module = modules[name]
        if isinstance(module, LoraLayer) and adapter_name in module.adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
        module.__class__ = lora_class_for(module)
        module._adapter_setup(name)
        spec = LoraSpec.for_target(config, name)
        # the first adapter on a layer becomes active, as in PEFT
        module.add_lora(adapter_name, spec, jax.random.fold_in(key, i), config.init_lora_weights)
    _mark_biases(modules, targets, config.bias)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config


# PEFT's warnings, word for word (peft/tuners/lora/layer.py, dispatch_default)
FAN_IN_FAN_OUT_LINEAR_WARNING = (
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
)
FAN_IN_FAN_OUT_CONV1D_WARNING = (
    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
)


def _settle_fan_in_fan_out(config: LoraConfig, targets: list[nnx.Module]) -> LoraConfig:
    """``fan_in_fan_out`` as PEFT's ``dispatch_default`` leaves it, with PEFT's warnings.

    PEFT visits the targets in order and flips the config on a mismatch: ``True`` on a
    ``torch.nn.Linear`` (the twin of an ``nnx.Linear``, ``LinearGeneral`` or ``Einsum``, whose
    adapters are written in its layout) becomes ``False``; ``False`` on transformers' ``Conv1D``
    (whose weight is stored ``(in, out)``) becomes ``True``. Embeddings and convolutions leave
    it as it is, and so do quantized linears (PEFT's bitsandbytes dispatchers come first and do
    not check; transformers made even GPT-2's ``Conv1D`` an ``[out, in]`` bitsandbytes linear).
    The value is only what the saved ``adapter_config.json`` says: peftjax's own layouts do not
    depend on it.
    """
    fan_in_fan_out = config.fan_in_fan_out
    for module in targets:
        if isinstance(module, QuantizedLinear):
            continue  # PEFT's bitsandbytes dispatchers take such a layer before dispatch_default: no check
        if stores_in_out(module):
            if not fan_in_fan_out:
                warnings.warn(FAN_IN_FAN_OUT_CONV1D_WARNING, stacklevel=3)
                fan_in_fan_out = True
        elif isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)) and fan_in_fan_out:
            warnings.warn(FAN_IN_FAN_OUT_LINEAR_WARNING, stacklevel=3)
            fan_in_fan_out = False
    if fan_in_fan_out == config.fan_in_fan_out:
        return config
    return dataclasses.replace(config, fan_in_fan_out=fan_in_fan_out)


def _mark_biases(modules: dict[str, nnx.Module], targets: list[str], mode: str) -> None:
    """``bias="all"``/``"lora_only"``: those base biases become trainable."""
    if mode == "none":
        return
    chosen = targets if mode == "lora_only" else [n for n in modules if n]
    for name in chosen:
        bias = getattr(modules[name], "bias", None)
        if isinstance(bias, nnx.Param) and not isinstance(bias, TrainableParam):
            modules[name].bias = TrainableParam(bias.get_value())


