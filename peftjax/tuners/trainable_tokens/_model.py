"""Putting trainable tokens into an NNX model, standalone or beside LoRA, and PEFT's file keys.

``TrainableTokensConfig`` targets embedding layers by ``target_modules`` (default: the model's input
embedding); ``LoraConfig.trainable_token_indices`` names them by suffix (a list: the input
embedding), as PEFT's ``TrainableTokensWrapper`` does. Both share :func:`add_token_adapters`.

Tied LM heads: the bundled models tie the head by calling the input embedding's ``attend``, which
the layer overrides, so the head follows the adapter's rows as PEFT's tied adapter does. A
standalone adapter's file then also carries PEFT's copy of the rows under
``base_model.model.lm_head.trainable_tokens_delta`` (PEFT writes it; LoRA's wrapper does not).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from peftjax.config import TrainableTokensConfig, match_modules
from peftjax.io._adapter import PREFIX, AdapterFileError, map_name
from peftjax.tuners.base import (
    AdapterLayer,
    layer_state_dict,
    load_layer_state_dict,
    model_type,
    named_modules,
    original_class,
    validate_adapter_name,
)
from peftjax.tuners.trainable_tokens._layer import (
    STANDALONE,
    TokensSpec,
    TrainableTokensLayer,
    tokens_class_for,
)


def input_embedding_name(model: nnx.Module) -> str | None:
    """The path of the model's input embedding (PEFT's ``_get_input_embeddings_name``), or ``None``."""
    from peftjax.tuners.prompt._model import _find_word_embeddings

    return _find_word_embeddings(model, getattr(getattr(model, "config", None), "vocab_size", None))


def _describe(module: nnx.Module) -> str:
    if isinstance(module, AdapterLayer):
        return f"{original_class(module).__name__} with a {type(module).__name__} adapter"
    return type(module).__name__


def add_token_adapters(
    model: nnx.Module,
    targets: Mapping[str, tuple[int, ...]],
    adapter_name: str,
    *,
    file_suffix: str,
    init: bool = True,
    key: jax.Array,
    option: str,
) -> None:
    """Adds adapter ``adapter_name`` to each embedding in ``targets`` (full path -> token ids), in place.

    Every target is checked before any is changed.

    Raises:
      TypeError: a target is not an ``nnx.Embed`` or carries another method's adapter (names
        ``option``, the path and the class).
      NotImplementedError: a target is a linear layer with a bias (PEFT's forward would drop it).
      ValueError: no token ids, an id outside the vocabulary, or the adapter exists there.
    """
    modules = named_modules(model)
    for name, indices in targets.items():
        module = modules[name]
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(module, nnx.Linear) and (module.bias is not None or module.out_features != vocab):
            raise NotImplementedError(
                f"{option}: {name} ({type(module).__name__}, {module.out_features} outputs"
                f"{', biased' if module.bias is not None else ''}) is a linear layer that is not a bias-free output "
                f"layer over the vocabulary ({vocab} tokens): trainable tokens take an untied lm_head (PEFT's "
                "forward computes it without a bias), and embeddings"
            )
        if tokens_class_for(module) is None:
            raise TypeError(f"{option}: {name} ({_describe(module)}) is not an nnx.Embed or a bias-free "
                            "nnx.Linear without another adapter")
        if not indices:
            raise ValueError(f"{option}: no token indices for {name}")
        rows = module.out_features if isinstance(module, nnx.Linear) else module.num_embeddings
        bad = [i for i in indices if i >= rows]
        if bad:
            raise ValueError(f"{option}: token indices {bad} are outside {name}'s {rows} tokens")
        if isinstance(module, TrainableTokensLayer) and adapter_name in module.adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
    for i, (name, indices) in enumerate(targets.items()):
        module = modules[name]
        module.__class__ = tokens_class_for(module)
        module._adapter_setup(name)
        module.add_tokens(adapter_name, TokensSpec(tuple(indices), file_suffix), jax.random.fold_in(key, i), init)


def inject_trainable_tokens(
    model: nnx.Module, config: TrainableTokensConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> TrainableTokensConfig:
    """Adds trainable-tokens adapter ``adapter_name`` to the embeddings ``config`` targets, in place.

    Args:
      model: any NNX module; the targets must be ``nnx.Embed`` layers.
      config: the token ids and targets; ``target_modules=None`` becomes the model's input
        embedding's path (a str, as PEFT writes it).
      adapter_name: the name under which the rows are stored.
      key: the init key for ``init_weights=False``.

    Returns:
      The resolved config.

    Raises:
      ValueError: no input embedding found, nothing matches ``target_modules``, or bad token ids.
      TypeError / NotImplementedError: see :func:`add_token_adapters`.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_trainable_tokens(model, peftjax.TrainableTokensConfig(token_indices=[3, 5]))  # doctest: +SKIP
    >>> model.model.embed_tokens.trainable_tokens_delta["default"].shape  # doctest: +SKIP
    (2, 32)
    """
    import dataclasses

    validate_adapter_name(adapter_name)
    if config.target_modules is None:
        name = input_embedding_name(model)
        if name is None:
            raise ValueError("TrainableTokensConfig.target_modules is None and the model has no input embedding "
                             "(an nnx.Embed); name the embedding layers in target_modules")
        config = dataclasses.replace(config, target_modules=name)
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    add_token_adapters(model, {n: config.token_indices for n in targets}, adapter_name, file_suffix=STANDALONE,
                       init=config.init_weights, key=jax.random.key(0) if key is None else key,
                       option="TrainableTokensConfig")
    return config


def _tied_head(model: nnx.Module) -> str | None:
    """The input embedding's path when the model's ``lm_head`` is tied to it, else ``None``."""
    tied = getattr(model, "_tied", None)
    if tied is None or not tied("lm_head.weight") or "lm_head" in named_modules(model):
        return None
    return input_embedding_name(model)


def tokens_state_dict(model: nnx.Module, adapter_name: str, config, *, key_mapping=None,
                      save_embedding_layers="auto") -> dict[str, np.ndarray]:
    """PEFT's file dict of a ``TrainableTokensConfig`` adapter, with the tied head's copy of the rows."""
    out = layer_state_dict(model, adapter_name, config, layer_type=TrainableTokensLayer, key_mapping=key_mapping,
                           save_embedding_layers=save_embedding_layers)
    embed = _tied_head(model)
    own = f"{PREFIX}{map_name(embed, key_mapping)}.{STANDALONE}" if embed else None
    if own in out:
        out[f"{PREFIX}lm_head.{STANDALONE}"] = out[own]
    return out


def load_tokens_state_dict(model: nnx.Module, tensors: Mapping[str, np.ndarray], adapter_name: str, *,
                           key_mapping=None, source: str = "adapter") -> tuple[list[str], list[str]]:
    """Loads a ``TrainableTokensConfig`` adapter; the tied head's copy must equal the embedding's rows."""
    tensors = dict(tensors)
    head = tensors.pop(f"{PREFIX}lm_head.{STANDALONE}", None)
    embed = _tied_head(model)
    if head is not None and embed is not None:
        own = tensors.get(f"{PREFIX}{map_name(embed, key_mapping)}.{STANDALONE}")
        if own is not None and not np.array_equal(np.asarray(own, np.float32), np.asarray(head, np.float32)):
            raise AdapterFileError(f"{source}: {PREFIX}lm_head.{STANDALONE} differs from the tied input embedding's "
                                   "rows; a tied head cannot hold other values")
    elif head is not None:
        tensors[f"{PREFIX}lm_head.{STANDALONE}"] = head  # not tied here: reported as unexpected
    return load_layer_state_dict(model, tensors, adapter_name, layer_type=TrainableTokensLayer,
                                 key_mapping=key_mapping, source=source)
