"""Picking a bundled model class for a checkpoint: ``peftjax.models.from_pretrained``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftjax.models._modeling import CONFIG_NAME, PreTrainedModel
from peftjax.models._scan import MODEL_OPTIONS

# architecture name -> class; filled by register()
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {}
# model_type -> the class used when config.architectures names none we know
DEFAULT_CLASSES: dict[str, type[PreTrainedModel]] = {}


def register(cls: type[PreTrainedModel], *, model_types: tuple[str, ...] = (), default: bool = False):
    """Makes ``cls`` loadable by its class name (``architectures`` in config.json)."""
    MODEL_CLASSES[cls.__name__] = cls
    if default:
        for t in model_types:
            DEFAULT_CLASSES[t] = cls
    return cls


def load_config(path: str | os.PathLike, **overrides):
    """Reads ``config.json`` through ``transformers.AutoConfig`` (local files only)."""
    from transformers import AutoConfig

    path = Path(path)
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    supported = sorted({c for c in DEFAULT_CLASSES})
    if model_type not in DEFAULT_CLASSES:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported; supported: {supported}")
    options = {k: overrides.pop(k) for k in MODEL_OPTIONS if k in overrides}
    config, unused = AutoConfig.from_pretrained(
        str(path), local_files_only=True, return_unused_kwargs=True, **overrides
    )
    if unused:
        raise TypeError(f"{file}: {sorted(unused)} are not fields of {type(config).__name__}")
    for k, v in options.items():  # peftjax's own options ride on the config; save_pretrained drops them
        setattr(config, k, v)
    return config


def model_class_for(config) -> type[PreTrainedModel]:
    """The class named by ``config.architectures``, else the default for ``config.model_type``."""
    for arch in getattr(config, "architectures", None) or ():
        if arch in MODEL_CLASSES:
            return MODEL_CLASSES[arch]
    if config.model_type in DEFAULT_CLASSES:
        return DEFAULT_CLASSES[config.model_type]
    raise ValueError(
        f"model_type {config.model_type!r} (architectures {config.architectures}) is not supported; "
        f"supported architectures: {sorted(MODEL_CLASSES)}"
    )


def from_pretrained(path: str | os.PathLike, dtype=None, **config_overrides) -> PreTrainedModel:
    """Loads a Hugging Face checkpoint directory into the matching bundled Flax NNX model.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` plus its shards.
      dtype: parameter and compute dtype (``None``: float32).
      **config_overrides: config fields to override, e.g. ``num_labels=2``, and peftjax's model
        options: ``scan_layers=True`` (stack the layers and run them with ``jax.lax.scan``: Llama
        family, GPT-2, BERT; generation, prefix adapters and base-model dropout loop over the
        stacked layers instead) and ``remat="none" | "full" | "dots_saveable"`` (``jax.checkpoint``
        policy of each layer when they are scanned or looped without a cache).

    Returns:
      The model, e.g. a ``LlamaForCausalLM``.

    Raises:
      FileNotFoundError: the directory, ``config.json`` or the weights are missing.
      ValueError: the model type is unsupported, or a weight is missing or mis-shaped.

    >>> model = from_pretrained("path/to/llama")  # doctest: +SKIP
    >>> model(input_ids=[[1, 2, 3]]).logits.shape  # doctest: +SKIP
    (1, 3, 32000)
    """
    config = load_config(path, **config_overrides)
    return model_class_for(config).from_pretrained(path, dtype=dtype, **config_overrides)
