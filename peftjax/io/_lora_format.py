"""LoRA adapters <-> PEFT state dicts (key names and torch layouts of reference §1.4)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from peftjax.config import LoraConfig
from peftjax.io._adapter import EMBEDDING_LAYER_NAMES, KeyMapping
from peftjax.io._layer_format import layer_state_dict, load_layer_state_dict
from peftjax.tuners._lora_nnx import LoraLayer


def _targets_embeddings(config: LoraConfig) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        return False
    return any(t in EMBEDDING_LAYER_NAMES or t.endswith(tuple("." + e for e in EMBEDDING_LAYER_NAMES))
               for t in targets or ())


def lora_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: LoraConfig,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """The adapter ``adapter_name`` as PEFT's ``get_peft_model_state_dict`` would write it."""
    save_emb = _targets_embeddings(config) if save_embedding_layers == "auto" else bool(save_embedding_layers)
    return layer_state_dict(model, adapter_name, layer_type=LoraLayer, key_mapping=key_mapping,
                            save_embeddings=save_emb, bias=config.bias)


def load_lora_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Sets adapter ``adapter_name`` (already injected) from a PEFT state dict.

    Returns:
      ``(missing, unexpected)`` file keys: adapter keys the file lacks (their weights keep the
      init values, as in PEFT) and file keys nothing in the model consumed.

    Raises:
      AdapterFileError: a tensor's shape disagrees with the config's rank (names key and shapes)
        or is not a float tensor.
    """
    return load_layer_state_dict(model, tensors, adapter_name, layer_type=LoraLayer, key_mapping=key_mapping,
                                 source=source)
