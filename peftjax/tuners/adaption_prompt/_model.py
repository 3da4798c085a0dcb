"""Putting adaption prompts into an NNX model: the top ``adapter_layers`` attention modules, as PEFT picks them.

PEFT 0.22.0 (``AdaptionPromptModel.add_adapter``) wraps every module whose name ends with
``.<target_modules>``, in model order, and keeps the last ``adapter_layers`` of them; it supports
the model types of ``ADAPTION_PROMPT_TARGET_MODULES`` (Llama, Mistral, GPT-2) and refuses the
others. peftjax does the same on its bundled models.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from peftjax.config import AdaptionPromptConfig
from peftjax.config._adaption_prompt import ADAPTION_PROMPT_TARGET_MODULES
from peftjax.tuners.base import AdapterLayer, mixin_subclass, model_type, named_modules, validate_adapter_name
from peftjax.tuners.adaption_prompt._layer import (
    AdaptedGPT2Attention,
    AdaptedLlamaAttention,
    AdaptionPromptLayer,
    AdaptionPromptSpec,
)


def _attention_classes() -> dict[str, tuple[type, type]]:
    """model_type -> (the bundled attention class, its adaption-prompt mixin)."""
    from peftjax.models._gpt2 import GPT2Attention
    from peftjax.models._llama import LlamaAttention

    return {
        "llama": (LlamaAttention, AdaptedLlamaAttention),
        "mistral": (LlamaAttention, AdaptedLlamaAttention),
        "gpt2": (GPT2Attention, AdaptedGPT2Attention),
    }


def _model_order(path: str) -> tuple:
    """Sorts dotted paths in model order: ``layers.10`` after ``layers.2``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def resolve_adaption_prompt_config(model: nnx.Module, config: AdaptionPromptConfig) -> AdaptionPromptConfig:
    """Checks the model type and the required fields; fills ``target_modules`` as PEFT's ``prepare_config``.

    Raises:
      ValueError: an unsupported model type (PEFT's message, with the supported ones), a missing
        ``adapter_len`` / ``adapter_layers``, or a ``target_modules`` other than the attention module.
    """
    type_name = model_type(model)
    if type_name not in ADAPTION_PROMPT_TARGET_MODULES:
        raise ValueError(f"Unsupported model type for adaption prompt: '{type_name}'. Supported model types: "
                         f"{sorted(ADAPTION_PROMPT_TARGET_MODULES)} (as in PEFT 0.22.0).")
    for field in ("adapter_len", "adapter_layers"):
        if getattr(config, field) is None:
            raise ValueError(f"AdaptionPromptConfig.{field} is None; set it to an int >= 1.")
    attention = ADAPTION_PROMPT_TARGET_MODULES[type_name]
    if config.target_modules is None:
        config = dataclasses.replace(config, target_modules=attention)
    if config.target_modules != attention:
        raise ValueError(
            f"AdaptionPromptConfig.target_modules={config.target_modules!r}: adaption prompts wrap the attention "
            f"module, which {type_name} models name {attention!r} (None picks it)."
        )
    return config


def inject_adaption_prompt(
    model: nnx.Module, config: AdaptionPromptConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> AdaptionPromptConfig:
    """Adds adaption prompt ``adapter_name`` to the top ``config.adapter_layers`` attention modules, in place.

    Args:
      model: a bundled Llama, Mistral or GPT-2 model (``peftjax.models``).
      config: the adapter settings.
      adapter_name: the name under which the weights are stored (``self_attn/adaption_prompt/<name>``).
      key: the prompt's init key (a fixed default keeps ``get_peft_model`` deterministic).

    Returns:
      The resolved config (``target_modules`` filled in).

    Raises:
      ValueError: an unsupported model type, more ``adapter_layers`` than the model has, a missing
        field, or ``scan_layers=True`` with fewer adapted layers than layers.
      TypeError: an attention module already carries another method's adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> config = peftjax.AdaptionPromptConfig(adapter_len=4, adapter_layers=1)  # doctest: +SKIP
    >>> peft_model = peftjax.get_peft_model(model, config)  # doctest: +SKIP
    >>> model.model.layers[1].self_attn.adaption_prompt["default"].shape  # hidden 32  # doctest: +SKIP
    (1, 4, 32)
    """
    validate_adapter_name(adapter_name)
    config = resolve_adaption_prompt_config(model, config)
    key = jax.random.key(0) if key is None else key
    attention_class, mixin = _attention_classes()[model_type(model)]
    modules = named_modules(model)
    found = sorted((n for n, m in modules.items() if n.endswith("." + config.target_modules)
                    and isinstance(m, attention_class)), key=_model_order)
    if len(found) < config.adapter_layers:
        raise ValueError(
            f"Config specifies more adapter layers '{config.adapter_layers}' than the model has '{len(found)}'."
        )
    if getattr(model.config, "scan_layers", False) and config.adapter_layers < len(found):
        raise ValueError(
            f"AdaptionPromptConfig.adapter_layers={config.adapter_layers} adapts only the top {config.adapter_layers} "
            f"of {len(found)} layers, but the model was built with scan_layers=True, which stacks all layers into "
            "one structure (an adapter on some layers only cannot be stacked); load the model with "
            f"scan_layers=False, or set adapter_layers={len(found)}"
        )
    targets = found[-config.adapter_layers:]
    mixed = [n for n in targets if isinstance(modules[n], AdapterLayer) and not isinstance(modules[n], AdaptionPromptLayer)]
    if mixed:
        raise TypeError(f"{mixed[0]} already carries another method's adapter; one method per layer is supported")
    hidden = model.config.hidden_size
    for name in targets:
        module = modules[name]
        if module.num_heads * module.head_dim != hidden:
            raise ValueError(
                f"{name}: num_attention_heads * head_dim = {module.num_heads * module.head_dim} differs from "
                f"hidden_size {hidden}; PEFT 0.22.0's adapted attention assumes they are equal"
            )
    for i, name in enumerate(targets):
        module = modules[name]
        if not isinstance(module, AdaptionPromptLayer):
            module.__class__ = mixin_subclass(type(module), mixin, "AdaptionPrompt")
        module._adapter_setup(name)
        module.add_adaption_prompt(adapter_name, AdaptionPromptSpec(adapter_len=config.adapter_len), hidden,
                                   jax.random.fold_in(key, i))
    return config
