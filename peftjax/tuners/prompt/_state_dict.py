"""Prompt learning's PEFT file layout: ``prompt_embeddings`` (the encoder's output) plus trained heads.

Unlike layer methods, the file holds what the encoder computes, not its weights; PEFT loads it
into an inference-mode adapter only.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import PeftConfig
from peftjax.io._adapter import AdapterFileError, KeyMapping, map_name
from peftjax.models._modeling import hf_state_dict, iter_hf_params
from peftjax.tuners.base import SavedModule, named_modules, set_tree_params_torch
from peftjax.tuners.prompt._model import MULTITASK, SAVED_PREFIX, PromptEncoder

TASK_FACTORS = ("prefix_task_cols", "prefix_task_rows")


def _encoder(model, adapter_name: str) -> PromptEncoder:
    encoders = getattr(model, "peft_prompt_encoders", None)
    if encoders is None or adapter_name not in encoders:
        raise ValueError(f"{type(model).__name__} has no prompt-learning adapter {adapter_name!r}")
    return encoders[adapter_name]


def _saved_heads(model, adapter_name: str, key_mapping: KeyMapping) -> dict[str, nnx.Module]:
    return {
        SAVED_PREFIX + map_name(name, key_mapping): m.modules_to_save[adapter_name]
        for name, m in named_modules(model).items()
        if isinstance(m, SavedModule) and adapter_name in m.modules_to_save
    }


def prompt_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: PeftConfig,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """``{"prompt_embeddings": encoder output}`` plus the trained task heads, as PEFT saves them;
    multitask prompt tuning adds its task factors (``prefix_task_cols``, ``prefix_task_rows``)."""
    del config, save_embedding_layers
    encoder = _encoder(model, adapter_name)
    out = {"prompt_embeddings": np.asarray(encoder(), np.float32)}
    for name in TASK_FACTORS if encoder.peft_type == MULTITASK else ():
        out[name] = np.asarray(encoder.weights[name].get_value(), np.float32)
    for path, copy in _saved_heads(model, adapter_name, key_mapping).items():
        for k, v in hf_state_dict(copy).items():
            out[f"{path}.{k}"] = v
    return out


def load_prompt_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Fills an injected (inference-mode) prompt adapter from PEFT's state dict.

    Returns:
      ``(missing, unexpected)`` file keys.

    Raises:
      ValueError: the adapter was injected trainable (PEFT refuses this too: the encoder's
        weights are not in the file).
      AdapterFileError: ``prompt_embeddings`` is absent, or a shape disagrees with the config.
    """
    encoder = _encoder(model, adapter_name)
    if not encoder.inference_mode:
        raise ValueError(
            "Cannot set a prompt learning adapter to trainable when loading pretrained adapter. "
            "(The file holds only the encoder's output; load with is_trainable=False.)"
        )
    names = {"prompt_embeddings": "embedding.weight"}
    if encoder.peft_type == MULTITASK:
        names.update({name: name for name in TASK_FACTORS})
    for key, weight in names.items():
        if key not in tensors:
            raise AdapterFileError(f"{source}: no `{key}` tensor; found {sorted(tensors)[:10]}")
        value = np.asarray(tensors[key])
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
            raise AdapterFileError(f"{source}: {key}: expected a float tensor, found dtype {value.dtype}")
        if key == "prompt_embeddings":
            try:
                encoder.load_prompt_embeddings(value, f"{source}: {key}")
            except ValueError as e:
                raise AdapterFileError(str(e)) from None
            continue
        expected = tuple(encoder.weights[weight].get_value().shape)
        if tuple(value.shape) != expected:
            raise AdapterFileError(f"{source}: {key}: expected shape {list(expected)} (from num_virtual_tokens, "
                                   f"num_ranks, num_tasks in the config), found {list(value.shape)}")
        encoder.weights[weight].set_value(jnp.asarray(value, jnp.float32))
    used, missing = set(names), []
    for path, copy in _saved_heads(model, adapter_name, key_mapping).items():
        own = {k[len(path) + 1:]: v for k, v in tensors.items() if k.startswith(path + ".")}
        used.update(f"{path}.{k}" for k in set_tree_params_torch(copy, own, f"{source}: {path}"))
        missing += [f"{path}.{k}" for k, _, _ in iter_hf_params(copy) if k not in own]
    unexpected = sorted(k for k in tensors if k not in used)
    if unexpected:
        warnings.warn(f"{source}: ignored {len(unexpected)} keys: {unexpected[:10]}", stacklevel=3)
    return missing, unexpected
