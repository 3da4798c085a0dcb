"""The base tuner: the model-wide operations every PEFT method shares.

Walking a model's modules, activating, disabling, freezing, merging, unmerging, unloading and
deleting adapters all work through the :class:`~peftjax.tuners.base.AdapterLayer` interface, so
they serve every method (LoRA, IA³, bottleneck, prompt learning) alike. Module names are dotted
NNX paths (``model.layers.0.self_attn.q_proj``); for the bundled models they are exactly
transformers' module names, so PEFT's targeting rules apply unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import (
    PeftConfig,
    add_task_modules_to_save,
    expand_all_linear,
    is_all_linear,
    is_module_to_save,
    match_modules,
)
from peftjax.models._modeling import iter_hf_params
from peftjax.nn._graph import iter_modules
from peftjax.tuners.base._layer import AdapterLayer, ModelMixin, check_adaptable, original_class
from peftjax.tuners.base._modules_to_save import SavedModule, module_params, set_param
from peftjax.tuners.base._variables import AdapterParam, FrozenAdapterParam, TrainableParam


def named_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every sub-module by dotted path, outside adapter containers (the root is ``""``)."""
    return {".".join(str(p) for p in path): m for path, m in iter_modules(model) if "modules_to_save" not in path}


def modules_in_definition_order(model: nnx.Module) -> list[str]:
    """Every sub-module's dotted path in the order the model's constructor assigned them (parents
    first), as torch's ``model.modules()`` walks a model: ``named_modules`` sorts paths, which a
    method whose state depends on the layers' order (Uni-LoRA's index assignment) must not. A
    bundled model answers for its class (:meth:`PreTrainedModel.definition_order`: its layers in
    transformers' order, whether built or loaded); any other module by its attributes' order."""
    from peftjax.nn._order import modules_in_assignment_order

    order = getattr(model, "definition_order", None)
    return list(order()) if callable(order) else modules_in_assignment_order(model)


def model_type(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_config(model: nnx.Module, config: PeftConfig) -> PeftConfig:
    """Fills PEFT's per-architecture default targets, expands ``all-linear``, adds task heads."""
    from peftjax.config import resolve_target_modules
    from peftjax.config._targeting import MOE_CONVERTED_TARGETS, convert_moe_lora_targets
    from peftjax.models._modeling import hf_param_map

    def all_linear(modules):
        linear = [n for n, m in modules.items() if isinstance(m, nnx.Linear) and n]
        return expand_all_linear(linear, "lm_head" if "lm_head" in modules else None, config.task_type)

    if model_type(model) in MOE_CONVERTED_TARGETS:  # Mixtral: the router and experts become target_parameters
        modules = named_modules(model)
        params = [f"{n}.{torch_name}" for n, m in modules.items() if n
                  for torch_name, _ in hf_param_map(m).values()]
        linear = [n for n, m in modules.items() if isinstance(m, nnx.Linear)]
        config = convert_moe_lora_targets(config, model_type(model), modules, params, all_linear(modules), linear)
    config = add_task_modules_to_save(config)
    if config.target_modules is None:
        try:
            config = resolve_target_modules(config, model_type(model) or "")
        except ValueError:
            if not getattr(config, "target_parameters", None):
                raise
            config = dataclasses.replace(config, target_modules=())  # PEFT: parameters alone are enough
    if is_all_linear(config.target_modules):
        config = dataclasses.replace(config, target_modules=tuple(all_linear(named_modules(model))))
    return config


def find_targets(
    model: nnx.Module, config: PeftConfig, layer_type: type, method: str
) -> tuple[dict[str, nnx.Module], list[str]]:
    """``(named_modules(model), targets)``: the modules ``config`` targets, each checked adaptable.

    Raises what ``match_modules`` and ``check_adaptable`` raise, before anything is changed.
    """
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    check_adaptable(modules, targets, layer_type, method)
    return modules, targets


def validate_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "." in name or name in (".", ".."):
        raise ValueError(f"adapter name {name!r} must be a non-empty string without '/', '\\\\' or '.'")


def check_modules_to_save(model: nnx.Module, config: PeftConfig) -> None:
    """Raises what :func:`match_modules_to_save` raises for ``config`` (its task head included),
    before anything is injected."""
    match_modules_to_save(add_task_modules_to_save(config), named_modules(model))


def match_modules_to_save(config: PeftConfig, modules: dict[str, nnx.Module]) -> list[str]:
    """The modules ``config.modules_to_save`` names (PEFT 0.22's segment match), outermost only: a module
    inside another one to save trains as part of that one's copy.

    Raises:
      ValueError: a matched module holds a weight without a transformers name (a module class
        with neither a known layer type nor an ``hf_param_map``), which the adapter file could
        not carry.
    """
    names = [n for n in modules if is_module_to_save(n, config.modules_to_save)]
    names = [n for n in names if not any(n.startswith(f"{outer}.") for outer in names)]
    for name in names:
        named = {id(v) for _, v, _ in iter_hf_params(modules[name])}
        unnamed = [f"{type(owner).__name__}.{attr}" for owner, attr, var in module_params(modules[name])
                   if id(var) not in named]
        if unnamed:
            raise ValueError(
                f"modules_to_save: {name} holds weights without a transformers name ({', '.join(unnamed[:5])}), "
                "so the adapter file could not carry its trained copy; give their module class an hf_param_map "
                "({flax attribute: (torch name, transpose)}) or leave the module out of modules_to_save"
            )
    return names


def stores_in_out(module: nnx.Module) -> bool:
    """Whether the layer's torch twin keeps its weight (in, out), as transformers' ``Conv1D`` does."""
    rule = getattr(type(module), "hf_param_map", None) or {}
    return "kernel" in rule and not rule["kernel"][1]


def adapter_layers(model: nnx.Module, layer_type: type = AdapterLayer, adapter_name: str | None = None
                   ) -> dict[str, AdapterLayer]:
    """Every adapter-carrying layer by dotted path: of any method, or of ``layer_type``; with
    ``adapter_name``, only those that carry that adapter."""
    return {n: m for n, m in named_modules(model).items()
            if isinstance(m, layer_type) and (adapter_name is None or adapter_name in m.adapter_names())}


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
    """Switches an adapter's weights between ``AdapterParam`` (trains) and ``FrozenAdapterParam``.

    A trainable weight gets its layer's own type back (``LoraParam`` on LoRA layers), except
    those its layer keeps frozen (``frozen_adapter_dicts``: MiCA's ``lora_B``). A weight several
    layers share (VB-LoRA's vector bank) stays one variable, shared.
    """
    converted: dict[int, nnx.Variable] = {}
    for m in named_modules(model).values():
        if isinstance(m, AdapterLayer):
            own_type = getattr(m, "param_type", AdapterParam) if trainable else FrozenAdapterParam
            fixed = {id(d) for d in m.frozen_adapter_dicts(adapter_name)} if adapter_name in m.adapter_names() \
                else set()
            for d in m.adapter_variable_dicts():
                if adapter_name in d:
                    old = d[adapter_name]
                    if id(old) not in converted:
                        new_type = FrozenAdapterParam if id(d) in fixed else own_type
                        converted[id(old)] = new_type(old.get_value())
                    d[adapter_name] = converted[id(old)]
        if isinstance(m, SavedModule) and adapter_name in m.modules_to_save:
            for owner, attr, var in module_params(m.modules_to_save[adapter_name]):
                set_param(owner, attr, (TrainableParam if trainable else nnx.Param)(var.get_value()))


def merge(model: nnx.Module, adapter_names: tuple[str, ...] | None = None, *, safe_merge: bool = False) -> None:
    """Folds the active (or the named) adapters into the base weights (for inference and export).

    With ``safe_merge``, the merged weights are checked for NaN and infinite values; if any
    layer has them, every layer is put back as it was (the arrays are immutable, so keeping the
    old ones is free) and ``ValueError`` names the adapter and the layer. PEFT checks layer by
    layer and leaves the layers before the broken one merged. A layer that refuses to merge (BEFT
    on a layer without a bias) puts every layer back the same way before its error propagates.
    """
    from peftjax.nn._scan import has_stacked_layers, unstacked

    if getattr(model, "replicated_layers", None) is not None:  # PEFT's refusal, for the same reason
        raise ValueError(f"cannot merge LoRA layers when the base model's layers are replicated (layer_replication "
                         f"{[list(p) for p in model.replicated_layers]}): the copies share one weight each")
    if has_stacked_layers(model):  # scan_layers=True: merged layer by layer (DoRA's norms), stacked again
        with unstacked(model, write=True):
            return merge(model, adapter_names, safe_merge=safe_merge)
    modules = named_modules(model)
    _refuse_shared_base_weights(modules)
    layers = [m for m in modules.values() if isinstance(m, AdapterLayer)]
    before = [(m, _param_values(m), m.merged_adapter_names()) for m in layers]
    try:
        for m in layers:
            names = adapter_names if adapter_names is not None else m.active_adapter_names()
            for name in reversed(names) if m.merge_last_first else names:
                if name in m.adapter_names() and name not in m.merged_adapter_names():
                    m.merge_adapter(name)
                    if safe_merge and not all(bool(jnp.isfinite(v).all()) for _, v in _param_values(m)):
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {name} seems to be broken "
                            f"(at {getattr(m, 'adapter_path', '?')}); nothing was merged"
                        )
    except Exception:
        _restore(before)
        raise


def _refuse_shared_base_weights(modules: dict) -> None:
    """Refuses to merge into a weight another module also holds (a model's tied blocks: Zamba2's
    shared transformer): the merge would change every module that holds it, each with the other's
    adapter (PEFT merges there all the same, adding each layer's delta to the one tensor).

    Raises:
      ValueError: an adapter layer's base weight is held by another module too (both named).
    """
    holders: dict[int, list[str]] = {}
    for path, module in modules.items():
        for value in vars(module).values():
            if type(value) is nnx.Param:
                holders.setdefault(id(value), []).append(path)
    for path, module in modules.items():
        if not isinstance(module, AdapterLayer):
            continue
        for value in vars(module).values():
            shared = holders.get(id(value), []) if type(value) is nnx.Param else []
            if len(shared) > 1:
                others = [p for p in shared if p != path]
                raise ValueError(f"cannot merge the adapter at {path}: its base weight is also {others}'s (the model "
                                 f"shares it between layers), so merging would change those layers too; keep the "
                                 f"adapter unmerged, or leave the shared layers out of its targets")


def _param_values(module: nnx.Module) -> list[tuple[nnx.Variable, jax.Array]]:
    """The module's weights with their current values (immutable arrays: keeping them is free)."""
    return [(v, v.get_value()) for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)]


def _restore(before) -> None:
    for m, params, merged in before:
        for var, value in params:
            var.set_value(value)
        for name in set(m.merged_adapter_names()) - set(merged):
            for attr in getattr(m, "merge_cache_dicts", ()):
                store = getattr(m, attr)
                if name in store:
                    del store[name]
        if not merged:
            for attr in ("premerge_weight", "premerge_bias"):  # a WeightReadingLayer's copies
                if hasattr(m, attr):
                    delattr(m, attr)
        m.adapter_merged = merged


def unmerge(model: nnx.Module) -> None:
    """Undoes :func:`merge` on every layer."""
    from peftjax.nn._scan import has_stacked_layers, unstacked

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
            copy = m.modules_to_save[active[0]] if active else None
            m.__class__ = original_class(m)
            for attr in ("modules_to_save", "saved_active", "saved_disabled"):
                delattr(m, attr)
            if copy is not None:  # the module's weights list in its copy's order: the copy was cloned from it
                for (owner, attr, _), (_, _, var) in zip(module_params(m), module_params(copy), strict=True):
                    set_param(owner, attr, nnx.Param(var.get_value()))
        if isinstance(m, AdapterLayer):
            m.remove_adapter_state()
            m.__class__ = original_class(m)
        if isinstance(m, ModelMixin):
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
