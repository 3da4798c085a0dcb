"""A resized vocabulary's weights in adapter files, as PEFT writes and reads them.

A model whose vocabulary was resized (``resize_token_embeddings``, for tokens a tokenizer gained)
has new embedding rows the base checkpoint lacks, so an adapter alone would not rebuild it. PEFT's
``save_embedding_layers="auto"`` then writes the input and output embeddings' whole weights beside
the adapter, under their plain keys (``base_model.model.model.embed_tokens.weight``,
``base_model.model.lm_head.weight``, the tied head's copy included), and loading puts them back into
the model, which must already have the file's vocabulary size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from peftjax.io._adapter import PREFIX, AdapterFileError, KeyMapping, map_name
from peftjax.models._resize import OUTPUT_EMBEDDING_KEYS, vocabulary_weights


def base_vocab_size(base_model_name_or_path: str | None) -> int | None:
    """The ``vocab_size`` of the base checkpoint's ``config.json`` (a local directory, or the Hub
    cache without the network), or ``None`` where there is none to read."""
    if not base_model_name_or_path:
        return None
    path = Path(base_model_name_or_path) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(base_model_name_or_path), "config.json")
        except Exception:  # noqa: BLE001 - not a repo id: nothing cached
            cached = None
        if not isinstance(cached, (str, os.PathLike)):
            return None
        path = Path(cached)
    config = json.loads(path.read_text())
    vocab = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    return int(vocab) if vocab is not None else None


def saves_vocabulary(model: nnx.Module, config, save_embedding_layers: bool | str) -> bool:
    """Whether the adapter file carries the model's vocabulary weights: ``True``, or ``"auto"``
    where the vocabulary was resized (in this process, or against the base checkpoint's config)."""
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return False
    if getattr(model, "resized_vocabulary_from", None) not in (None, vocab):
        return True
    base = base_vocab_size(getattr(config, "base_model_name_or_path", None))
    return base is not None and base != int(vocab)


def vocabulary_state_dict(model: nnx.Module, config, tensors: Mapping[str, np.ndarray],
                          save_embedding_layers: bool | str, key_mapping: KeyMapping = None) -> dict[str, np.ndarray]:
    """The vocabulary weights' file entries to add to an adapter's ``tensors`` (none where
    :func:`saves_vocabulary` says no, or where the adapter targets the layer and saved it already);
    a tied output embedding's key carries the input embedding's copy, as torch's state dict does."""
    if getattr(getattr(model, "config", None), "vocab_size", None) is None:
        return {}
    if not saves_vocabulary(model, config, save_embedding_layers):
        return {}
    out = {}
    inputs = None
    for key, (var, axis, is_input) in vocabulary_weights(model).items():
        module, weight = key.rsplit(".", 1)
        module = map_name(module, key_mapping)
        if f"{PREFIX}{module}.base_layer.{weight}" in tensors:  # a targeted embedding: saved by its method
            continue
        value = np.asarray(var.get_value(), np.float32)
        value = np.moveaxis(value, axis, 0) if value.ndim == 2 else value  # torch layout: vocabulary first
        out[f"{PREFIX}{_wrapped_name(module, tensors)}.{weight}"] = value
        if is_input:
            inputs = value
    tied = getattr(model, "_tied", None)
    if inputs is not None and tied is not None:
        for key in OUTPUT_EMBEDDING_KEYS:
            name = _file_key(key, key_mapping)
            if key.endswith(".weight") and tied(key) and name not in tensors:
                out[name] = inputs
    return out


def _file_key(key: str, key_mapping: KeyMapping) -> str:
    """A transformers weight ``key``'s entry in an adapter file, its module named by ``key_mapping``."""
    module, weight = key.rsplit(".", 1)
    return f"{PREFIX}{map_name(module, key_mapping)}.{weight}"


def _wrapped_name(module: str, tensors: Mapping[str, np.ndarray]) -> str:
    """``module``'s name for its base weight in PEFT's file: under ``token_adapter.base_layer`` where
    LoRA's ``trainable_token_indices`` wraps it, ``base_layer`` where another adapter does (its keys
    sit under the module), the module itself otherwise."""
    if any(k.startswith(f"{PREFIX}{module}.token_adapter.") for k in tensors):
        return f"{module}.token_adapter.base_layer"
    if any(k.startswith(f"{PREFIX}{module}.") for k in tensors):
        return f"{module}.base_layer"
    return module


def load_vocabulary_weights(model: nnx.Module, tensors: dict[str, np.ndarray], *, source: str,
                            key_mapping: KeyMapping = None) -> dict:
    """Puts a file's vocabulary weights into ``model`` (which must have the file's vocabulary
    size); returns ``tensors`` without them. A tied output embedding's copy must equal the input's.

    Raises:
      AdapterFileError: a weight whose shape is not the model's, naming the key, both shapes and
        what to do (``resize_token_embeddings`` first), or a tied copy that differs.
    """
    if getattr(getattr(model, "config", None), "vocab_size", None) is None:
        return tensors
    weights = vocabulary_weights(model)
    rest = dict(tensors)
    for key, (var, axis, _) in weights.items():
        module, weight = key.rsplit(".", 1)
        module = map_name(module, key_mapping)
        wrapped = (module, f"{module}.base_layer", f"{module}.token_adapter.base_layer")
        names = [f"{PREFIX}{m}.{weight}" for m in wrapped]
        found = [n for n in names if n in rest]
        if not found:
            continue
        value = rest.pop(found[0])
        for other in found[1:]:
            rest.pop(other)
        current = var.get_value()
        ours = tuple(np.moveaxis(np.empty(current.shape, np.bool_), axis, 0).shape)
        if tuple(value.shape) != ours:
            raise AdapterFileError(
                f"{source}: {found[0]} has shape {tuple(value.shape)}, the model's is {ours}: the file's model "
                f"had a vocabulary of {value.shape[0]} tokens, this one {model.config.vocab_size}; call "
                f"model.resize_token_embeddings({value.shape[0]}) on the base model first (as with transformers)")
        array = np.moveaxis(np.asarray(value, np.float32), 0, axis) if value.ndim == 2 else np.asarray(value)
        var.set_value(jax.device_put(array.astype(current.dtype)))
    tied = getattr(model, "_tied", None)
    for key in OUTPUT_EMBEDDING_KEYS:
        copy = rest.get(_file_key(key, key_mapping))
        if copy is None or tied is None or not key.endswith(".weight") or not tied(key):
            continue
        inputs = next((w for w in weights.values() if w[2]), None)
        if inputs is not None and copy.shape == inputs[0].get_value().shape:
            if not np.array_equal(np.asarray(copy, np.float32), np.asarray(inputs[0].get_value(), np.float32)):
                raise AdapterFileError(f"{source}: {PREFIX}{key} differs from the tied input embedding it copies")
            del rest[_file_key(key, key_mapping)]
    return rest
