"""Putting LoRA into an NNX model and taking it out: inject, activate, merge, unload.

Module names are dotted NNX paths (``model.layers.0.self_attn.q_proj``); for the bundled models
they are exactly transformers' module names, so PEFT's targeting rules apply unchanged.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import LoraConfig, add_task_modules_to_save, expand_all_linear, is_all_linear, match_modules
from peftjax.config._targeting import check_target_module_exists  # noqa: F401  (re-exported for users)
import abc

from peftjax.tuners._base_layer import AdapterLayer
from peftjax.tuners._lora_nnx import (
    SUPPORTED_LAYERS,
    LoraLayer,
    LoraSpec,
    lora_class_for,
    mixin_subclass,
    original_class,
)
from peftjax.tuners._variables import LoraParam, TrainableParam


class FrozenAdapterParam(nnx.Param):
    """An adapter weight loaded for inference (``is_trainable=False``): frozen like the base."""


def named_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every sub-module by dotted path, outside adapter containers (the root is ``""``)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and "modules_to_save" not in path:
            out[".".join(str(p) for p in path)] = node
    return out


def lora_layers(model: nnx.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in named_modules(model).items() if isinstance(m, LoraLayer)}


def _model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_config(model: nnx.Module, config: LoraConfig) -> LoraConfig:
    """Fills PEFT's per-architecture default targets, expands ``all-linear``, adds task heads."""
    from peftjax.config import resolve_target_modules

    config = add_task_modules_to_save(config)
    if config.target_modules is None:
        config = resolve_target_modules(config, _model_type(model) or "")
    if is_all_linear(config.target_modules):
        modules = named_modules(model)
        linear = [n for n, m in modules.items() if isinstance(m, nnx.Linear) and n]
        output = "lm_head" if "lm_head" in modules else None
        config = dataclasses.replace(
            config, target_modules=tuple(expand_all_linear(linear, output, config.task_type))
        )
    return config


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
    targets = match_modules(config, [n for n in modules if n], model_type=_model_type(model))
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
        if adapter_name in getattr(module, "lora_specs", ()) and adapter_name in module.lora_spec:
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
        module.__class__ = lora_class_for(module)
        module._lora_setup(name)
        r, alpha, scaling = config.scaling_for(name)
        spec = LoraSpec(
            r=r,
            alpha=alpha,
            scaling=scaling,
            dropout=float(config.lora_dropout),
            use_dora=bool(config.use_dora),
            lora_bias=bool(config.lora_bias),
        )
        module.add_lora(adapter_name, spec, jax.random.fold_in(key, i), config.init_lora_weights)
        if not module.lora_active:  # the first adapter on a layer is active, as in PEFT
            module.lora_active = (adapter_name,)
    _mark_biases(modules, targets, config.bias)
    for name in _match_modules_to_save(config, modules):
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
    it as it is. The value is only what the saved ``adapter_config.json`` says: peftjax's own
    layouts do not depend on it.
    """
    fan_in_fan_out = config.fan_in_fan_out
    for module in targets:
        if _stores_in_out(module):
            if not fan_in_fan_out:
                warnings.warn(FAN_IN_FAN_OUT_CONV1D_WARNING, stacklevel=3)
                fan_in_fan_out = True
        elif isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)) and fan_in_fan_out:
            warnings.warn(FAN_IN_FAN_OUT_LINEAR_WARNING, stacklevel=3)
            fan_in_fan_out = False
    if fan_in_fan_out == config.fan_in_fan_out:
        return config
    return dataclasses.replace(config, fan_in_fan_out=fan_in_fan_out)


def _stores_in_out(module: nnx.Module) -> bool:
    """Whether the layer's torch twin keeps its weight (in, out), as transformers' ``Conv1D`` does."""
    rule = getattr(type(module), "hf_param_map", None) or {}
    return "kernel" in rule and not rule["kernel"][1]


def validate_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "." in name or name in (".", ".."):
        raise ValueError(f"adapter name {name!r} must be a non-empty string without '/', '\\\\' or '.'")


def _mark_biases(modules: dict[str, nnx.Module], targets: list[str], mode: str) -> None:
    """``bias="all"``/``"lora_only"``: those base biases become trainable."""
    if mode == "none":
        return
    chosen = targets if mode == "lora_only" else [n for n in modules if n]
    for name in chosen:
        bias = getattr(modules[name], "bias", None)
        if isinstance(bias, nnx.Param) and not isinstance(bias, TrainableParam):
            modules[name].bias = TrainableParam(bias.get_value())


def _match_modules_to_save(config: LoraConfig, modules: dict[str, nnx.Module]) -> list[str]:
    wanted = config.modules_to_save or ()
    # PEFT: a name matches when it equals an entry or ends with "." + entry
    return [n for n in modules if n and any(n == m or n.endswith("." + m) for m in wanted)]


class SavedModule(abc.ABC):
    """Mixin for a ``modules_to_save`` layer: each adapter trains its own full copy."""

    def __call__(self, *args, **kwargs):
        for name in self.saved_active:
            if name in self.modules_to_save and not self.saved_disabled:
                return self.modules_to_save[name](*args, **kwargs)
        return self._peftjax_base.__call__(self, *args, **kwargs)


def add_saved_copy(module: nnx.Module, adapter_name: str) -> None:
    """Makes ``module`` a ``modules_to_save`` layer with a trainable copy for ``adapter_name``."""
    if not isinstance(module, SavedModule):
        copy = nnx.clone(module)
        module.__class__ = mixin_subclass(type(module), SavedModule, "Saved")
        module.modules_to_save = nnx.Dict()
        module.saved_active = ()
        module.saved_disabled = False
    else:
        copy = nnx.clone(module)
        copy.__class__ = original_class(module)
        for attr in ("modules_to_save", "saved_active", "saved_disabled"):
            delattr(copy, attr)
    for attr, var in list(vars(copy).items()):
        if isinstance(var, nnx.Param):
            # a real copy: the train step donates trainable buffers, which must not be the frozen original's
            setattr(copy, attr, TrainableParam(jnp.array(var.get_value(), copy=True)))
    module.modules_to_save[adapter_name] = copy
    if not module.saved_active:
        module.saved_active = (adapter_name,)


def adapter_layers(model: nnx.Module) -> dict[str, AdapterLayer]:
    """Every adapter-carrying layer (any method) by dotted path."""
    return {n: m for n, m in named_modules(model).items() if isinstance(m, AdapterLayer)}


def set_active_adapters(model: nnx.Module, names: tuple[str, ...]) -> None:
    for m in named_modules(model).values():
        if isinstance(m, AdapterLayer):
            m.set_active_adapters(names)
        if isinstance(m, SavedModule):
            m.saved_active = tuple(n for n in names if n in m.modules_to_save)


def set_adapters_disabled(model: nnx.Module, disabled: bool) -> None:
    for m in named_modules(model).values():
        if isinstance(m, AdapterLayer):
            m.set_adapters_disabled(disabled)
        if isinstance(m, SavedModule):
            m.saved_disabled = disabled


def set_adapter_trainable(model: nnx.Module, adapter_name: str, trainable: bool) -> None:
    """Switches an adapter's weights between ``LoraParam`` (trains) and ``FrozenAdapterParam``."""
    new_type = LoraParam if trainable else FrozenAdapterParam
    for m in named_modules(model).values():
        if isinstance(m, AdapterLayer):
            for d in m.adapter_variable_dicts():
                if adapter_name in d:
                    d[adapter_name] = new_type(d[adapter_name].get_value())
        if isinstance(m, SavedModule) and adapter_name in m.modules_to_save:
            copy = m.modules_to_save[adapter_name]
            for attr, var in list(vars(copy).items()):
                if isinstance(var, nnx.Param):
                    setattr(copy, attr, (TrainableParam if trainable else nnx.Param)(var.get_value()))


def merge(model: nnx.Module, adapter_names: tuple[str, ...] | None = None) -> None:
    """Folds the active (or the named) adapters into the base weights (for inference and export)."""
    from peftjax.models._scan import has_stacked_layers, unstacked

    if has_stacked_layers(model):  # scan_layers=True: merged layer by layer (DoRA's norms), stacked again
        with unstacked(model, write=True):
            return merge(model, adapter_names)
    for m in named_modules(model).values():
        if isinstance(m, AdapterLayer):
            names = adapter_names if adapter_names is not None else m.active_adapter_names()
            for name in names:
                if name in m.adapter_names() and name not in m.merged_adapter_names():
                    m.merge_adapter(name)


def unmerge(model: nnx.Module) -> None:
    """Undoes :func:`merge` on every layer."""
    from peftjax.models._scan import has_stacked_layers, unstacked

    if has_stacked_layers(model) and any(m.merged_adapter_names() for m in adapter_layers(model).values()):
        with unstacked(model, write=True):
            return unmerge(model)
    for m in named_modules(model).values():
        if isinstance(m, AdapterLayer):
            for name in reversed(m.merged_adapter_names()):
                m.unmerge_adapter(name)


def unload(model: nnx.Module, *, merge_first: bool, adapter_names: tuple[str, ...] | None = None) -> nnx.Module:
    """Removes every adapter (after merging the active ones when ``merge_first``), in place.

    ``modules_to_save`` layers keep the active adapter's trained copy, as PEFT's
    ``merge_and_unload`` does; trainable biases become plain ``nnx.Param`` again.
    """
    if merge_first:
        merge(model, adapter_names)
    for m in named_modules(model).values():
        if isinstance(m, SavedModule):
            active = [n for n in m.saved_active if n in m.modules_to_save] if merge_first else []
            if active:
                copy = m.modules_to_save[active[0]]
                for attr, var in vars(copy).items():
                    if isinstance(var, nnx.Param):
                        setattr(m, attr, nnx.Param(var.get_value()))
            m.__class__ = original_class(m)
            for attr in ("modules_to_save", "saved_active", "saved_disabled"):
                delattr(m, attr)
        if isinstance(m, AdapterLayer):
            m.remove_adapter_state()
            m.__class__ = original_class(m)
        for attr, var in list(vars(m).items()):
            if isinstance(var, TrainableParam):
                setattr(m, attr, nnx.Param(var.get_value()))
    return model


def delete_adapter(model: nnx.Module, adapter_name: str) -> None:
    for m in named_modules(model).values():
        if isinstance(m, AdapterLayer):
            m.delete_adapter(adapter_name)
        if isinstance(m, SavedModule) and adapter_name in m.modules_to_save:
            del m.modules_to_save[adapter_name]
            m.saved_active = tuple(n for n in m.saved_active if n != adapter_name)
