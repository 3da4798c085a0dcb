"""Putting a LyCORIS adapter (LoHa, LoKr) into an NNX model: the targeting both methods share.

PEFT's ``LycorisTuner`` adapts ``torch.nn.Linear`` (and convolutions) only; transformers'
``Conv1D`` (GPT-2) and embeddings raise ``TypeError`` there, and here too, so that every adapter
made here loads in PEFT.
"""

from __future__ import annotations

import jax
from flax import nnx

from peftjax.config import LycorisConfig
from peftjax.tuners.base import (
    add_saved_copy,
    find_targets,
    match_modules_to_save,
    mixin_subclass,
    resolve_config,
    stores_in_out,
    validate_adapter_name,
)
from peftjax.tuners.lycoris._layer import LycorisLayer


def inject_lycoris(
    model: nnx.Module,
    config: LycorisConfig,
    *,
    adapter_name: str,
    key: jax.Array | None,
    layer_class: type[LycorisLayer],
    prefix: str,
    add: str,
) -> LycorisConfig:
    """Adds adapter ``adapter_name`` with ``layer_class``'s ``add`` method to every targeted layer.

    Args:
      model: the NNX model.
      config: a resolved or unresolved ``LoHaConfig`` / ``LoKrConfig``.
      adapter_name: the name the weights are stored under.
      key: the init key (a fixed default keeps injection deterministic).
      layer_class: the method's layer mixin (``LoHaLinear``, ``LoKrLinear``).
      prefix: the swapped class name's prefix (``"LoHa"``).
      add: the layer method that creates one adapter, ``(name, r, alpha, config, key)``.

    Returns:
      The resolved config.

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest names are listed).
      TypeError: a target is not a ``torch.nn.Linear`` twin (GPT-2's ``Conv1D``, an embedding,
        a norm), or already carries another method's adapter.
    """
    validate_adapter_name(adapter_name)
    method = layer_class.method_name
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules, targets = find_targets(model, config, layer_class, method)
    conv1d = [n for n in targets if stores_in_out(modules[n])]
    if conv1d:
        listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in conv1d[:10])
        raise TypeError(
            f"{method} cannot adapt {listed}: HF PEFT's {method} supports torch.nn.Linear (and convolutions) only, "
            "not transformers' Conv1D (GPT-2), so its adapter could not be loaded there; target nn.Linear layers"
        )
    for i, name in enumerate(targets):
        module = modules[name]
        if not isinstance(module, layer_class):
            module.__class__ = mixin_subclass(type(module), layer_class, prefix)
        module._adapter_setup(name)
        r, alpha = config.rank_and_alpha(name)
        getattr(module, add)(adapter_name, r, alpha, config, jax.random.fold_in(key, i))
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
