"""Putting LoRA into an NNX model: ``inject_lora``.

The model-wide operations that serve every method (activate, merge, unload, ...) are the base
tuner's (``peftjax.tuners.base``); this file holds what only LoRA does when it injects.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import LoftQConfig, LoraConfig, match_modules
from peftjax.nn._keys import LayerKey, seed_key
from peftjax.quantization import QuantizedLinear
from peftjax.tuners.base import (
    AdapterLayer,
    adapter_layers,
    add_saved_copy,
    adding_from_file,
    mark_biases,
    match_modules_to_save,
    model_type,
    named_modules,
    original_class,
    resolve_config,
    settle_fan_in_fan_out,
    stores_in_out,
    validate_adapter_name,
)
from peftjax.tuners.base._linear_options import (  # noqa: F401  (re-exported for the Linen front end)
    FAN_IN_FAN_OUT_CONV1D_WARNING,
    FAN_IN_FAN_OUT_LINEAR_WARNING,
)
from peftjax.tuners.lora._layer import SUPPORTED_LAYERS, LoraLayer, LoraSpec, lora_class_for
from peftjax.tuners.lora._alora import check_alora_model, take_alora
from peftjax.tuners.lora._astra import check_astra_eigens, take_astra_eigens
from peftjax.tuners.lora._corda import check_eigens, take_eigens
from peftjax.tuners.lora._loraga import take_grad
from peftjax.tuners.lora._math import check_block_diagonal, check_init_rank, check_kasa_rank, peft_weight_shape
from peftjax.tuners.lora._param import check_parameters, inject_parameters, match_parameters
from peftjax.tuners.lora._replication import _layer_list, replicate_layers, set_config
from peftjax.tuners.trainable_tokens import add_token_adapters, input_embedding_name
from peftjax.tuners.trainable_tokens._layer import WRAPPED


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
    from peftjax.nn._scan import has_stacked_layers, unstacked

    if config.layer_replication:  # the deeper model first, its copies then adapted like any layer
        return _inject_replicated(model, config, adapter_name=adapter_name, key=key)
    if has_stacked_layers(model):  # scan_layers=True: inject per layer, then stack the adapters too
        with unstacked(model, write=True):
            return inject_lora(model, config, adapter_name=adapter_name, key=key)
    config = resolve_config(model, config)
    key = seed_key(0) if key is None else key
    modules = named_modules(model)
    if config.target_parameters and not config.target_modules:  # PEFT: parameters alone are enough
        targets = []
    else:
        targets = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    _check_kasa_mixing(modules, config, adapter_name)
    for option, what, _ in _LINEAR_VARIANTS:  # PEFT's ParamWrapper has none of them
        if config.target_parameters and getattr(config, option) is not None:
            raise ValueError(f"Invalid or unsupported variant combination: ('{option}',) on target_parameters="
                             f"{list(config.target_parameters)}: lora.ParamWrapper does not work when `{option}` is "
                             f"set ({what} adapts linear layers: target_modules)")
    if config.alora_invocation_tokens is not None:
        check_alora_model(model)
    if config.target_parameters:  # checked before the first change to the model
        matched = match_parameters(config, modules)
        if not matched and not targets:
            raise ValueError(f"target_parameters={list(config.target_parameters)} matched no parameter (a key is "
                             "'<module path>.<parameter name>', e.g. 'model.layers.0.mlp.experts.gate_up_proj') and "
                             "target_modules matched no module")
        if not matched:
            warnings.warn(f"target_parameters={list(config.target_parameters)} were set but no parameter was matched.",
                          RuntimeWarning, stacklevel=2)
        check_parameters(modules, matched, config)
    unsupported = [
        (n, f"{original_class(modules[n]).__name__} with a {type(modules[n]).__name__} adapter"
         if isinstance(modules[n], AdapterLayer) else type(modules[n]).__name__)
        for n in targets
        if lora_class_for(modules[n]) is None
    ]
    if unsupported:
        listed = ", ".join(f"{n} ({c})" for n, c in unsupported[:10])
        raise TypeError(f"LoRA cannot adapt {listed}; supported layers: {', '.join(SUPPORTED_LAYERS)}")
    token_targets = _token_targets(model, config, modules, targets)
    config = settle_fan_in_fan_out(config, [modules[n] for n in targets])
    # what the layers get as init_lora_weights: LoftQ's settings stand in for the string
    init = LoftQConfig.from_value(config.loftq_config) if config.init_lora_weights == "loftq" else \
        config.init_lora_weights
    inits = {name: init for name in targets}
    for name in targets:  # every refusal comes before the first change to the model
        linear = lora_class_for(modules[name]) is not None and lora_class_for(modules[name]).lora_kind == "linear"
        if init in ("eva", "corda", "astra") and linear and not isinstance(modules[name], nnx.Linear):
            raise NotImplementedError(f"{name}: init_lora_weights={init!r} is implemented for nnx.Linear layers (and "
                                      f"GPT-2's Conv1D as one), not {type(modules[name]).__name__}")
        spec = LoraSpec.for_target(config, name)
        r = spec.r
        if init == "corda" and linear:  # CorDA's init is the layer's own eigens
            inits[name] = take_eigens(modules[name], name)
            check_eigens(inits[name], modules[name], r, name)
        if init == "astra" and linear:  # Astra's init is the layer's own eigens
            inits[name] = take_astra_eigens(modules[name], name)
            check_astra_eigens(inits[name], modules[name], r, name)
        if init == "lora_ga" and linear and isinstance(modules[name], nnx.Linear):
            # its gradient, as preprocess_loraga left it; a file's adapter takes the default init and
            # keeps the base as it is, as PEFT's does when the layer has no gradient
            inits[name] = True if adding_from_file() else take_grad(modules[name], name, config.lora_ga_config)
        cls = lora_class_for(modules[name])
        if config.arrow_config is not None and cls.lora_kind != "linear":  # PEFT's router is a Linear variant
            raise TypeError(f"{name}: an Arrow router (arrow_config) routes linear layers only, not "
                            f"{type(modules[name]).__name__}")
        _check_variant_target(modules[name], cls, name, config)
        cls.check_lora(modules[name], name, use_dora=bool(config.use_dora), lora_bias=bool(config.lora_bias),
                       init=inits[name])
        weight = getattr(modules[name], cls.weight_attr, None)  # a 2-D kernel [in, out] or table [num, dim]
        two_d = weight is not None and len(weight.shape) == 2
        shape = peft_weight_shape(cls.lora_kind, *weight.shape) if two_d else None
        check_init_rank(init, r, name, shape)
        if spec.block_diagonal is not None:  # a linear layer's [in, out] kernel (checked above)
            check_block_diagonal(spec, *weight.shape, name)
        if spec.kasa is not None:
            check_kasa_rank(r, weight.shape, name)
    for i, name in enumerate(targets):
        module = modules[name]
        if isinstance(module, LoraLayer) and adapter_name in module.adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
        module.__class__ = lora_class_for(module)
        module._adapter_setup(name)
        spec = LoraSpec.for_target(config, name)
        # the first adapter on a layer becomes active, as in PEFT
        module.add_lora(adapter_name, spec, LayerKey(key, i), inits[name])
        for cache in ("corda_eigens", "astra_eigens"):  # used up, as PEFT's layer uses its own
            if hasattr(module, cache):
                delattr(module, cache)
        if hasattr(module, "loraga_grad") and config.init_lora_weights == "lora_ga":
            del module.loraga_grad
    if config.target_parameters:
        inject_parameters(modules, matched, config, adapter_name, key)
    if config.alora_invocation_tokens is not None:
        take_alora(model, config.alora_invocation_tokens)
    mark_biases(modules, targets, config.bias)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    if token_targets:
        add_token_adapters(model, token_targets, adapter_name, file_suffix=WRAPPED, key=jax.random.fold_in(key, len(targets)),
                           option="LoraConfig.trainable_token_indices")
    return config


def kasa_loss(model: nnx.Module, adapter_names: str | list[str] | None = None) -> jax.Array:
    """KaSA's two regularisers over every layer of its adapters, for a loss function to add to the
    task's (PEFT's ``LoraModel._get_kasa_loss``, which PEFT leaves to the user's loop too)::

        def loss_fn(model, batch):
            return model(**batch).loss + peftjax.kasa_loss(model)

        step = peftjax.make_train_step(graphdef, optimizer, loss_fn=loss_fn)

    Each layer adds ``beta * sum(lora_diag^2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)`` with its
    adapter's ``kasa_config`` weights; a pure function of the adapters' arrays, so it traces under
    ``jit`` and differentiates.

    Args:
      model: a :class:`~peftjax.PeftModel` or the module a ``loss_fn`` gets (its ``base_model``).
      adapter_names: the adapters to count (default: each layer's active ones, as PEFT's).

    Returns:
      A float32 scalar; zero where no adapter uses KaSA.
    """
    from peftjax.tuners.lora._math import kasa_regularizer

    module = getattr(model, "base_model", model)
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    total = jnp.zeros((), jnp.float32)
    for layer in lora_layers(module).values():
        chosen = layer.active_adapter_names() if names is None else names
        for name, spec in layer.adapter_specs:
            if spec.kasa is not None and name in chosen:
                total = total + kasa_regularizer(layer.lora_A[name].get_value(), layer.lora_B[name].get_value(),
                                                 layer.lora_diag[name].get_value(), *spec.kasa)
    return total


# LoRA variants PEFT defines for its Linear layer alone: (option, name, what its bitsandbytes layers do)
_LINEAR_VARIANTS = (("use_bdlora", "BD-LoRA", "give it plain LoRA factors"),
                    ("kasa_config", "KaSA", "give it plain LoRA factors"),
                    ("velora_config", "VeLoRA", "refuse it"),
                    ("alora_invocation_tokens", "aLoRA", None))  # PEFT's bitsandbytes layers run aLoRA


def _check_variant_target(module: nnx.Module, cls: type, name: str, config: LoraConfig) -> None:
    """BD-LoRA, KaSA, VeLoRA and aLoRA are variants of PEFT's ``Linear`` LoRA layer: its embeddings
    and convolutions refuse them, and so do quantized layers here (but for aLoRA, which PEFT's
    bitsandbytes layers run); KaSA refuses GPT-2's ``Conv1D``."""
    for option, what, quantized in _LINEAR_VARIANTS:
        if getattr(config, option) is None:
            continue
        if cls.lora_kind != "linear":
            raise ValueError(f"{name}: Invalid or unsupported variant combination: ('{option}',): {what} adapts "
                             f"linear layers, not {type(module).__name__}; leave this layer out of target_modules")
        if isinstance(module, QuantizedLinear) and quantized is not None:
            raise NotImplementedError(f"{name}: {what} ({option}) on a quantized layer is not supported (PEFT's "
                                      f"bitsandbytes layers {quantized}); load the base in floating point")
    if config.kasa_config is not None and stores_in_out(module):  # PEFT's message
        raise ValueError(f"{name}: KaSA does not support `fan_in_fan_out=True` layers (e.g. Conv1D). Please target "
                         "nn.Linear layers.")


def _check_kasa_mixing(modules, config: LoraConfig, adapter_name: str) -> None:
    """PEFT's rule: KaSA truncates the base weights, so a model's LoRA adapters all use it or none does."""
    new = config.kasa_config is not None
    for module in modules.values():
        if isinstance(module, LoraLayer) and module.lora_kind != "param":
            for other, spec in module.adapter_specs:
                if other != adapter_name and (spec.kasa is not None) is not new:
                    raise ValueError(
                        "KaSA cannot be combined with adapters that don't use KaSA, since KaSA modifies the base "
                        f"weights: the new adapter {'uses' if new else 'does not use'} KaSA but adapter '{other}' "
                        f"{'does not' if new else 'does'}.")


def _inject_replicated(model: nnx.Module, config: LoraConfig, *, adapter_name: str, key) -> LoraConfig:
    """``inject_lora`` after PEFT's ``replicate_layers``; a refusal puts the layers back as they were."""
    if adapter_layers(model):
        raise ValueError(f"adapter {adapter_name!r}: layer_replication changes the base's layers, so it comes with "
                         "the first adapter (this model has adapters already)")
    owner, attribute = _layer_list(model)
    layers, config_before = getattr(owner, attribute), model.config.hf_config
    replicate_layers(model, config.layer_replication)
    try:
        resolved = inject_lora(model, dataclasses.replace(config, layer_replication=None), adapter_name=adapter_name,
                               key=key)
        return dataclasses.replace(resolved, layer_replication=config.layer_replication)
    except Exception:
        setattr(owner, attribute, layers)
        set_config(model, config_before)
        del model.replicated_layers
        raise


def _token_targets(model, config: LoraConfig, modules, lora_targets) -> dict[str, tuple[int, ...]]:
    """``trainable_token_indices`` as ``{embedding path: token ids}``, checked as PEFT checks it.

    A list means the input embedding; a dict's keys match the module names ending with them.
    """
    option = "LoraConfig.trainable_token_indices"
    indices = config.trainable_token_indices
    if indices is None:
        return {}
    if not isinstance(indices, dict):
        name = input_embedding_name(model)
        if name is None:
            raise ValueError(f"{option} is a list but the model has no input embedding (an nnx.Embed); pass a dict "
                             "{embedding module name: token indices}")
        indices = {name.rsplit(".", 1)[-1]: indices}
    for layer in indices:
        if any(layer in (m, m.rsplit(".", 1)[-1]) for m in config.modules_to_save or ()):
            raise ValueError(
                "The embedding layer is already marked to be trained fully, either specify "
                f'`modules_to_save=[..., "{layer}", ...]` or `trainable_tokens={{\'{layer}\': x}}` but not both.'
            )
    out = {}
    for layer, ids in indices.items():
        found = [n for n in modules if n and "modules_to_save" not in n and n.endswith(layer)]
        if not found:
            raise ValueError(f"{option}: no module name ends with {layer!r} (a tied LM head has no module of its "
                             "own here: it follows the input embedding's trainable tokens)")
        out.update({n: ids for n in found})
    both = sorted(set(out) & set(lora_targets))
    if both:
        raise TypeError(f"{option}: {both} are also LoRA target_modules; an embedding takes LoRA or trainable "
                        "tokens here, not both")
    return out
