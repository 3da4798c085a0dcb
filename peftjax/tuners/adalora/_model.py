"""Putting AdaLoRA into an NNX model, and its file layout with PEFT's ``rank_pattern`` resizing.

PEFT saves a budgeted adapter (``rank_pattern`` set) with only the kept rows of ``lora_A`` /
``lora_E`` and columns of ``lora_B`` (``resize_state_dict_by_rank_pattern``), and on load builds
each layer at the kept rank (``resize_modules_by_rank_pattern``, ``ranknum`` left at ``init_r``).
Both are done here the same way; ``ranknum`` is never in the file.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from peftjax.config import AdaLoraConfig
from peftjax.io._adapter import PREFIX, KeyMapping, map_name
from peftjax.tuners.adalora._layer import AdaLoraLayer, AdaLoraSpec, adalora_class_for
from peftjax.tuners.base import (
    AdapterParam,
    add_saved_copy,
    find_targets,
    layer_state_dict,
    load_layer_state_dict,
    mark_biases,
    match_modules_to_save,
    named_modules,
    resolve_config,
    settle_fan_in_fan_out,
    validate_adapter_name,
)


def rank_pattern_key(torch_path: str) -> str:
    """The ``rank_pattern`` key of a layer, as PEFT saves it: ``<module path>.lora_E``."""
    return f"{torch_path}.lora_E"


def inject_adalora(
    model: nnx.Module, config: AdaLoraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> AdaLoraConfig:
    """Adds AdaLoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; the targets must be ``nnx.Linear`` (GPT-2's ``Conv1D`` included);
        PEFT's AdaLoRA has no embedding layer, nor has this.
      config: the AdaLoRA settings; ``target_modules=None`` is PEFT's AdaLoRA default for the
        model type. With ``rank_pattern`` (a saved, budgeted adapter) each layer gets the kept rank.
      adapter_name: the name under which the factors are stored (``lora_E/<name>``, ...).
      key: the init key (a fixed default keeps it deterministic).

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; ``rank_pattern`` has a mask whose length is
        not ``init_r``; or another AdaLoRA adapter on the model is trainable and this one is too
        (PEFT's rule: one trainable AdaLoRA adapter).
      TypeError: a target is not a linear layer, or carries another method's adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> config = peftjax.AdaLoraConfig(init_r=4, total_step=10, target_modules=["q_proj"])  # doctest: +SKIP
    >>> inject_adalora(model, config)  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.lora_E["default"].shape  # doctest: +SKIP
    (4, 1)
    """
    validate_adapter_name(adapter_name)
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules, targets = find_targets(model, config, AdaLoraLayer, "AdaLoRA")
    config = settle_fan_in_fan_out(config, [modules[n] for n in targets])
    if not config.inference_mode:  # PEFT's rule: the allocator budgets one adapter
        trainable = sorted({n for m in named_modules(model).values() if isinstance(m, AdaLoraLayer)
                            for n in m.adapter_names() if n != adapter_name and isinstance(m.lora_A[n], AdapterParam)})
        if trainable:
            raise ValueError(
                f"AdaLoraModel supports only 1 trainable adapter ({trainable} is trainable). When using multiple "
                "adapters, set inference_mode to True for all adapters except the one you want to train.")
    pattern = config.rank_pattern or {}
    for name in targets:
        mask = pattern.get(rank_pattern_key(map_name(name, None)))
        if mask is not None and len(mask) != config.init_r:
            raise ValueError(f"rank_pattern[{rank_pattern_key(name)!r}] has {len(mask)} entries; expected "
                             f"init_r={config.init_r}")
    for i, name in enumerate(targets):
        module = modules[name]
        module.__class__ = adalora_class_for(module)
        module._adapter_setup(name)
        mask = pattern.get(rank_pattern_key(map_name(name, None)))
        r = config.init_r if mask is None else sum(mask)
        scaling = float(config.lora_alpha) if config.lora_alpha > 0 else float(r)
        spec = AdaLoraSpec(r=r, scaling=scaling, dropout=float(config.lora_dropout))
        module.add_adalora(adapter_name, spec, config.init_r, jax.random.fold_in(key, i), config.init_lora_weights)
    mark_biases(modules, targets, config.bias)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config


def adalora_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: AdaLoraConfig,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """PEFT's on-disk dict; with ``config.rank_pattern``, only the kept rows (PEFT's resizing)."""
    out = layer_state_dict(model, adapter_name, config, layer_type=AdaLoraLayer, key_mapping=key_mapping,
                           save_embedding_layers=save_embedding_layers)
    for name, mask in (config.rank_pattern or {}).items():
        keep = np.asarray(mask, bool)
        prefix = PREFIX + name[: -len(".lora_E")] if name.endswith(".lora_E") else PREFIX + name
        for suffix, axis in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
            k = f"{prefix}.{suffix}"
            if k in out and out[k].shape[axis] != keep.sum():  # PEFT: resize only a full-rank tensor
                out[k] = np.compress(keep, out[k], axis=axis)
    return out


def load_adalora_state_dict(model, tensors, adapter_name, *, key_mapping=None, source="adapter"):
    """Fills an injected AdaLoRA adapter (already at the kept ranks) from PEFT's keys."""
    return load_layer_state_dict(model, tensors, adapter_name, layer_type=AdaLoraLayer, key_mapping=key_mapping,
                                 source=source)
