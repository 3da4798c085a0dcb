"""LoRA adapters <-> PEFT state dicts (key names and torch layouts of reference §1.4)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from flax import nnx

from peftjax.config import LoraConfig
from peftjax.io._adapter import (
    EMBEDDING_LAYER_NAMES,
    PREFIX,
    AdapterFileError,
    KeyMapping,
    map_name,
    module_params_torch,
    set_module_params_torch,
)
from peftjax.tuners._lora import SavedModule, named_modules
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
    out: dict[str, np.ndarray] = {}
    modules = named_modules(model)
    save_emb = _targets_embeddings(config) if save_embedding_layers == "auto" else bool(save_embedding_layers)
    for name, module in modules.items():
        path = PREFIX + map_name(name, key_mapping)
        targeted = isinstance(module, LoraLayer) and adapter_name in module.lora_spec
        if targeted:
            for suffix, value in module.peft_tensors(adapter_name).items():
                out[f"{path}.{suffix}"] = np.asarray(value, np.float32)
            if save_emb and name.split(".")[-1] in EMBEDDING_LAYER_NAMES:
                out[f"{path}.base_layer.weight"] = module_params_torch(module)["weight"]
        if isinstance(module, SavedModule) and adapter_name in module.modules_to_save:
            for k, v in module_params_torch(module.modules_to_save[adapter_name]).items():
                out[f"{path}.{k}"] = v
        bias = getattr(module, "bias", None)
        if config.bias != "none" and isinstance(bias, nnx.Param) and not isinstance(module, SavedModule):
            if targeted:
                out[f"{path}.base_layer.bias"] = np.asarray(bias.get_value())
            elif config.bias == "all" and isinstance(module, LoraLayer) is False:
                out[f"{path}.bias"] = np.asarray(bias.get_value())
    return out


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
    for key, value in tensors.items():
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
            raise AdapterFileError(f"{source}: {key}: expected a float tensor, found dtype {value.dtype}")
    used: set[str] = set()
    missing: list[str] = []
    # keys without the prefix are accepted too, as PEFT accepts them from inject_adapter_in_model
    by_prefix = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}
    for name, module in named_modules(model).items():
        if not name:
            continue
        path = map_name(name, key_mapping)
        own = {k[len(path) + 1:]: v for k, v in by_prefix.items() if k.startswith(path + ".")}
        if isinstance(module, LoraLayer) and adapter_name in module.lora_spec:
            try:
                missing += module.load_peft_tensors(adapter_name, own, PREFIX + path)
            except ValueError as e:
                raise AdapterFileError(f"{source}: {e}") from None
            used.update(f"{path}.{s}" for s in module.peft_layout() if s in own)
            base = {k[len("base_layer."):]: v for k, v in own.items() if k.startswith("base_layer.")}
            if base:
                set_module_params_torch(module, base, f"{source}: {PREFIX}{path}.base_layer")
                used.update(f"{path}.base_layer.{k}" for k in base)
        elif isinstance(module, SavedModule) and adapter_name in module.modules_to_save:
            direct = {k: v for k, v in own.items() if "." not in k}
            set_module_params_torch(module.modules_to_save[adapter_name], direct, f"{source}: {PREFIX}{path}")
            used.update(f"{path}.{k}" for k in direct)
        elif "bias" in own and isinstance(getattr(module, "bias", None), nnx.Param):
            # bias="all" saves the biases of untargeted modules under their plain names
            set_module_params_torch(module, {"bias": own["bias"]}, f"{source}: {PREFIX}{path}")
            used.add(f"{path}.bias")
    unexpected = sorted(PREFIX + k for k in by_prefix if k not in used)
    if unexpected:
        warnings.warn(f"{source}: ignored {len(unexpected)} keys that match no adapter layer: {unexpected[:10]}",
                      stacklevel=3)
    return missing, unexpected
