"""Adapter layers <-> PEFT state dicts, for every layer-based method (LoRA, IA³, bottleneck).

Each layer kind states its own key suffixes and torch layouts (``peft_layout``); this module walks
the model, adds ``modules_to_save`` copies, trainable biases and saved embeddings, and does the
reverse on load, with the checks and warnings PEFT users expect.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from flax import nnx

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


def layer_state_dict(
    model: nnx.Module,
    adapter_name: str,
    *,
    layer_type: type,
    key_mapping: KeyMapping = None,
    save_embeddings: bool = False,
    bias: str = "none",
) -> dict[str, np.ndarray]:
    """PEFT's on-disk dict for one adapter of ``layer_type`` layers, ``modules_to_save`` included.

    ``bias`` is LoRA's option: ``"lora_only"`` adds ``P.base_layer.bias`` of targeted layers,
    ``"all"`` also ``P.bias`` of every other module.
    """
    out: dict[str, np.ndarray] = {}
    for name, module in named_modules(model).items():
        path = PREFIX + map_name(name, key_mapping)
        targeted = isinstance(module, layer_type) and adapter_name in module.adapter_names()
        if targeted:
            for suffix, value in module.peft_tensors(adapter_name).items():
                out[f"{path}.{suffix}"] = np.asarray(value, np.float32)
            if save_embeddings and name.split(".")[-1] in EMBEDDING_LAYER_NAMES:
                out[f"{path}.base_layer.weight"] = module_params_torch(module)["weight"]
        if isinstance(module, SavedModule) and adapter_name in module.modules_to_save:
            # saved as the plain module's keys, without modules_to_save.<name> (reference §1.4)
            for k, v in module_params_torch(module.modules_to_save[adapter_name]).items():
                out[f"{path}.{k}"] = v
        module_bias = getattr(module, "bias", None)
        if bias != "none" and isinstance(module_bias, nnx.Param) and not isinstance(module, SavedModule):
            if targeted:
                out[f"{path}.base_layer.bias"] = np.asarray(module_bias.get_value())
            elif bias == "all" and not isinstance(module, layer_type):
                out[f"{path}.bias"] = np.asarray(module_bias.get_value())
    return out


def load_layer_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    layer_type: type,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Fills an injected adapter of ``layer_type`` layers from PEFT's keys.

    Returns:
      ``(missing, unexpected)``: adapter keys the file lacks (left at their init values, as PEFT
      does) and file keys nothing in the model consumed (ignored with a warning).

    Raises:
      AdapterFileError: a tensor is not a float tensor, or has the wrong shape (names the key).
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
        if isinstance(module, layer_type) and adapter_name in module.adapter_names():
            try:
                missing += module.load_peft_tensors(adapter_name, own, PREFIX + path)
            except ValueError as e:
                raise AdapterFileError(f"{source}: {e}") from None
            used.update(f"{path}.{s}" for s in module.peft_layout(adapter_name) if s in own)
            base = {k[len("base_layer."):]: v for k, v in own.items() if k.startswith("base_layer.")}
            if base:
                set_module_params_torch(module, base, f"{source}: {PREFIX}{path}.base_layer")
                used.update(f"{path}.base_layer.{k}" for k in base)
        elif isinstance(module, SavedModule) and adapter_name in module.modules_to_save:
            # PEFT's bias="all" also saves the wrapper's biases: the trained copy's under
            # modules_to_save.<name>, the frozen original's under original_module.<name>
            wrapped = {part: {k[len(part) + 1:]: v for k, v in own.items()
                              if k.startswith(part + ".") and k.count(".") == 1}
                       for part in ("modules_to_save", "original_module")}
            direct = {k: v for k, v in own.items() if "." not in k}
            set_module_params_torch(module.modules_to_save[adapter_name], {**wrapped["modules_to_save"], **direct},
                                    f"{source}: {PREFIX}{path}")
            set_module_params_torch(module, wrapped["original_module"], f"{source}: {PREFIX}{path}.original_module")
            used.update(f"{path}.{k}" for k in direct)
            used.update(f"{path}.{part}.{k}" for part, keys in wrapped.items() for k in keys)
        elif "bias" in own and isinstance(getattr(module, "bias", None), nnx.Param):
            # bias="all" saves the biases of untargeted modules under their plain names
            set_module_params_torch(module, {"bias": own["bias"]}, f"{source}: {PREFIX}{path}")
            used.add(f"{path}.bias")
    unexpected = sorted(PREFIX + k for k in by_prefix if k not in used)
    if unexpected:
        warnings.warn(f"{source}: ignored {len(unexpected)} keys that match no adapter layer: {unexpected[:10]}",
                      stacklevel=3)
    return missing, unexpected
