"""The injection every method that adapts linear layers one by one shares (OFT, BOFT, HRA, MiSS,
RoAd, DeLoRA, C3A, GraLoRA, SHiRA, HiRA, RandLoRA, VB-LoRA): resolve the targets, check them, refuse
everything before changing anything, then swap each target's class and add the adapter, mark
biases, copy ``modules_to_save``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from peftjax.config import PeftConfig, match_modules
from peftjax.tuners.base._layer import AdapterLayer
from peftjax.tuners.base._linear_options import mark_biases, settle_fan_in_fan_out
from peftjax.tuners.base._model import model_type, named_modules, resolve_config, stores_in_out, validate_adapter_name
from peftjax.tuners.base._model import match_modules_to_save
from peftjax.tuners.base._modules_to_save import add_saved_copy


def check_linear_targets(
    modules: dict[str, nnx.Module], targets: list[str], layer_type: type, method: str, *, embed: bool = False,
    conv1d: bool = False,
) -> None:
    """Fails, before anything changes, on targets PEFT's ``method`` does not adapt.

    Raises:
      TypeError: a target carries another method's adapter, is GPT-2's ``Conv1D`` (these methods
        of PEFT 0.22.0 accept ``torch.nn.Linear`` but not transformers' ``Conv1D``), an
        ``nnx.Embed`` where ``embed`` is false, or another layer type. ``conv1d``: the method
        adapts ``Conv1D`` too (GraLoRA).

    A bitsandbytes-quantized linear (``peftjax.quantization``) is an ``nnx.Linear`` whose ``kernel``
    reads dequantized and writes requantized, so every method adapts it as it adapts a float one.
    """
    problems = []
    for name in targets:
        m = modules[name]
        if isinstance(m, AdapterLayer) and not isinstance(m, layer_type):
            problems.append(f"{name} ({type(m).__name__}) already carries another method's adapter")
        elif isinstance(m, nnx.Embed) and embed:
            continue
        elif not isinstance(m, nnx.Linear):
            kinds = "nnx.Linear and nnx.Embed" if embed else "nnx.Linear"
            problems.append(f"{name} ({type(m).__name__}) is not supported; supported: {kinds}")
        elif stores_in_out(m) and not conv1d:
            problems.append(
                f"{name} is transformers' Conv1D (weight stored (in, out)), which HF PEFT's {method} does not "
                "support (only torch.nn.Linear" + (", torch.nn.Embedding" if embed else "") + " and Conv2d)"
            )
    if problems:
        raise TypeError(f"{method} cannot adapt: " + "; ".join(problems[:10]))


def inject_each_layer(
    model: nnx.Module,
    config: PeftConfig,
    *,
    adapter_name: str,
    key: jax.Array | None,
    layer_type: type,
    method: str,
    class_for: Callable[[nnx.Module], type],
    prepare: Callable[[PeftConfig, str, nnx.Module], Any],
    add: Callable[[nnx.Module, Any, jax.Array], None],
    embed: bool = False,
    conv1d: bool = False,
) -> PeftConfig:
    """Adds one method's adapter ``adapter_name`` to every layer ``config`` targets, in place.

    ``prepare(config, name, module)`` runs for every target before the first change (its refusals
    leave the model untouched) and returns what ``add(module, prepared, key)`` needs; ``add`` gets
    the target with its class already swapped by ``class_for`` and its adapter state set up, and a
    key folded from ``key`` (default ``jax.random.key(0)``) with the target's index. ``embed``: the
    method adapts ``nnx.Embed`` layers too (OFT); ``conv1d``: GPT-2's ``Conv1D`` too (GraLoRA).
    Bitsandbytes-quantized linears are adapted like float ones (their ``kernel`` reads dequantized).

    Returns:
      The resolved config (targets filled in, ``all-linear`` expanded, task heads added, a
      ``fan_in_fan_out`` field as PEFT leaves it).

    Raises:
      ValueError: nothing matches ``target_modules``; the adapter already exists on a layer; what
        ``prepare`` raises.
      TypeError: a target is not a layer the method adapts (:func:`check_linear_targets`).
    """
    validate_adapter_name(adapter_name)
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    check_linear_targets(modules, targets, layer_type, method, embed=embed, conv1d=conv1d)
    if hasattr(config, "fan_in_fan_out"):
        config = settle_fan_in_fan_out(config, [modules[n] for n in targets])
    for name in targets:
        if isinstance(modules[name], layer_type) and adapter_name in modules[name].adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
    prepared = {name: prepare(config, name, modules[name]) for name in targets}
    for i, name in enumerate(targets):
        module = modules[name]
        module.__class__ = class_for(module)
        module._adapter_setup(name)
        add(module, prepared[name], jax.random.fold_in(key, i))
    mark_biases(modules, targets, getattr(config, "bias", "none"))
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
