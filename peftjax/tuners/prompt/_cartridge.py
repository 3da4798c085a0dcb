"""Cartridge's helpers, as PEFT 0.22.0 has them (``peft/tuners/cartridge/utils.py``): start a
key/value prefix from the cache of a prefill, and join Cartridge adapters into one.

A Cartridge (``CartridgeConfig``) is trained key/value cache rows; the paper starts them from the
cache the base model computes for a text (its first ``num_virtual_tokens`` positions), which
:func:`initialize_kv_prefix_from_text` does for a Cartridge or a projection-free prefix-tuning
adapter. :func:`compose_cartridge_adapters` concatenates saved Cartridges' rows, the paper's
composition.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from peftjax.config import PeftConfig
from peftjax.io._adapter import read_adapter_weights, write_adapter

KV_PREFIX_TYPES = ("CARTRIDGE", "PREFIX_TUNING")


def prompt_embeddings_from_cache(cache: Sequence[dict], num_virtual_tokens: int) -> np.ndarray:
    """PEFT's saved matrix ``[V, num_layers * 2 * token_dim]`` from a prefill's per-layer cache
    (``{"k", "v"}``, each ``[1, length, kv_heads, head_dim]``): layer ``i``'s keys at slot ``2 i``,
    its values at ``2 i + 1``, as ``PeftModel.get_prompt`` reads them back.

    Raises:
      ValueError: the cache holds fewer than ``num_virtual_tokens`` positions, or more than one row.
    """
    k0 = np.asarray(cache[0]["k"])
    if k0.shape[0] != 1:
        raise ValueError(f"the cache of a single-sequence prefill (batch 1) is needed; got batch {k0.shape[0]}")
    if k0.shape[1] < num_virtual_tokens:
        raise ValueError(f"Need at least {num_virtual_tokens} cached tokens, got {k0.shape[1]}.")
    slots = [np.asarray(layer[kv], np.float32)[0, :num_virtual_tokens] for layer in cache for kv in ("k", "v")]
    return np.stack(slots, axis=1).reshape(num_virtual_tokens, -1)  # [V, 2L, heads, head_dim] flattened


def _kv_prefix_config(model, adapter_name: str | None):
    adapter_name = model.active_adapter if adapter_name is None else adapter_name
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    config = model.peft_config[adapter_name]
    if config.peft_type not in KV_PREFIX_TYPES:
        raise ValueError(f"Adapter '{adapter_name}' must be a CARTRIDGE or PREFIX_TUNING adapter "
                         f"(got {config.peft_type}).")
    if getattr(config, "prefix_projection", False):
        raise ValueError("Initialization from KV cache is not supported for prefix tuning with "
                         "`prefix_projection=True`.")
    return adapter_name, config


def _tokenize(tokenizer, text: str, use_chat_template: bool, max_length: int | None) -> np.ndarray:
    """PEFT's: the text as a system turn of the chat template, else (no template) plain."""
    def plain():
        return np.asarray(tokenizer(text, return_tensors="np", truncation=max_length is not None,
                                    max_length=max_length)["input_ids"])

    if not (use_chat_template and hasattr(tokenizer, "apply_chat_template")):
        return plain()
    try:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=True,
                                            add_generation_prompt=False, return_dict=False, return_tensors="np")
    except (TypeError, ValueError):  # no chat template, or a tokenizer without the full signature
        return plain()
    ids = np.asarray(ids)
    return ids[:, :max_length] if max_length is not None else ids


def initialize_kv_prefix_from_text(
    model,
    tokenizer,
    *,
    text: str,
    adapter_name: str | None = None,
    num_virtual_tokens: int | None = None,
    use_chat_template: bool = True,
    max_length: int | None = None,
) -> np.ndarray:
    """Starts a Cartridge (or projection-free prefix-tuning) adapter from the base model's cache of
    ``text``: the base, adapters disabled, prefills the text and the first ``num_virtual_tokens``
    cached keys and values become the adapter's rows. PEFT's helper of the same name, the same
    tokenization (a system turn of the chat template where the tokenizer has one).

    Args:
      model: a ``PeftModel`` on a causal LM (its base has a key/value cache).
      tokenizer: the base's tokenizer.
      text: at least ``num_virtual_tokens`` tokens of it.
      adapter_name: the adapter to fill (default: the active one).
      num_virtual_tokens: the adapter's (default, and the only length it takes).
      use_chat_template: whether to wrap the text as PEFT does.
      max_length: truncate the tokens to this many.

    Returns:
      The matrix loaded (``[V, num_layers * 2 * token_dim]``, what ``save_pretrained`` writes).

    Raises:
      ValueError: the adapter is not a Cartridge or a prefix without projection; the base has no
        cache (an encoder, a classifier); the text is shorter than the adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> model = peftjax.get_peft_model(base, peftjax.CartridgeConfig(num_virtual_tokens=64,  # doctest: +SKIP
    ...                                                               task_type="CAUSAL_LM"))
    >>> peftjax.initialize_kv_prefix_from_text(model, tokenizer, text=document)  # doctest: +SKIP
    """
    adapter_name, config = _kv_prefix_config(model, adapter_name)
    v = config.num_virtual_tokens if num_virtual_tokens is None else num_virtual_tokens
    base = model.base_model
    if not hasattr(base, "init_cache") or getattr(base.config, "is_encoder_decoder", False):
        raise ValueError(f"initialize_kv_prefix_from_text prefills a causal LM's key/value cache; "
                         f"{type(base).__name__} has none")
    ids = _tokenize(tokenizer, text, use_chat_template, max_length)
    with model.disable_adapter():
        out = base(input_ids=jnp.asarray(ids), attention_mask=jnp.ones(ids.shape, jnp.int32),
                   cache=base.init_cache(1, ids.shape[1]), cache_index=0)
    rows = prompt_embeddings_from_cache(out.past_key_values, v)
    base.peft_prompt_encoders[adapter_name].load_prompt_embeddings(rows, f"the cache of {ids.shape[1]} tokens")
    return rows


def compose_cartridge_adapters(
    adapter_paths: Sequence[str | os.PathLike], *, output_path: str | os.PathLike
) -> None:
    """Joins saved Cartridge adapters into one by concatenating their rows (the paper's composition,
    PEFT's helper): ``num_virtual_tokens`` is the sum, ``num_frozen_tokens`` the first adapter's.

    Raises:
      ValueError: fewer than two paths; one is not a Cartridge; their ``task_type``, ``token_dim``,
        ``num_layers``, ``num_attention_heads`` or ``num_transformer_submodules`` differ (named).
    """
    paths = [Path(p) for p in adapter_paths]
    if len(paths) < 2:
        raise ValueError("Need at least 2 adapters to compose.")
    configs = [PeftConfig.from_pretrained(p) for p in paths]
    for path, config in zip(paths, configs):
        if config.peft_type != "CARTRIDGE":
            raise ValueError(f"Adapter at '{path}' is not a CARTRIDGE adapter (got {config.peft_type}).")
    first = configs[0]
    for path, config in zip(paths[1:], configs[1:]):
        for attr in ("task_type", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
            if getattr(config, attr) != getattr(first, attr):
                raise ValueError(f"Incompatible CARTRIDGE configs for attribute '{attr}': {paths[0]} has "
                                 f"{getattr(first, attr)!r}, {path} {getattr(config, attr)!r}.")
    rows = np.concatenate([read_adapter_weights(p)["prompt_embeddings"] for p in paths], axis=0)
    composed = dataclasses.replace(first, num_virtual_tokens=rows.shape[0])
    write_adapter(output_path, composed, {"prompt_embeddings": rows})
