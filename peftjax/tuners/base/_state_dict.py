"""The one PEFT state-dict walk for layer methods (LoRA, IA³, bottleneck), both ways.

Each layer kind states its own key suffixes and torch layouts (``peft_layout``); this module walks
the model, adds ``modules_to_save`` copies, trainable biases and saved embeddings, and does the
reverse on load, with the checks and warnings PEFT users expect. Keys are PEFT's on-disk keys,
``base_model.model.<module path>.<suffix>`` (reference §1.4).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import PeftConfig
from peftjax.io._adapter import EMBEDDING_LAYER_NAMES, PREFIX, AdapterFileError, KeyMapping, map_name
from peftjax.models._modeling import hf_param_map, hf_state_dict, iter_hf_params
from peftjax.tuners.base._model import named_modules
from peftjax.tuners.base._modules_to_save import SavedModule


# adapter tensors PEFT saves as integers: SHiRA's positions
INTEGER_TENSORS = ("shira_indices", "paca_indices", "supertuning_indices", "unilora_indices_A", "unilora_indices_B")


def saves_embeddings(config: PeftConfig, save_embedding_layers: bool | str = "auto") -> bool:
    """Whether the adapter file carries the targeted embedding layers' base weights, for every method.

    ``"auto"`` (PEFT's default) saves them when ``target_modules`` lists an embedding layer
    (``embed_tokens``, ``lm_head``), by name or as the tail of a dotted name, but never for trainable
    tokens (``TrainableTokensConfig``, ``trainable_token_indices``); a regex ``target_modules``
    saves none. ``True`` / ``False`` decide outright.
    """
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    if getattr(config, "peft_type", None) == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None):
        return False  # PEFT: token adapters are meant to be small (a resized vocabulary aside: _vocabulary.py)
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        return False
    return any(t in EMBEDDING_LAYER_NAMES or t.endswith(tuple("." + e for e in EMBEDDING_LAYER_NAMES))
               for t in targets or ())


def layer_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: PeftConfig,
    *,
    layer_type: type,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """PEFT's on-disk dict for one adapter of ``layer_type`` layers, ``modules_to_save`` included.

    Args:
      model: the model carrying the adapter.
      adapter_name: which adapter.
      config: its resolved config. LoRA's ``bias``: ``"lora_only"`` adds ``P.base_layer.bias``
        of targeted layers, ``"all"`` also ``P.bias`` of every other module.
      layer_type: the method's layer mixin (``LoraLayer``, ``IA3Layer``, ...).
      key_mapping: NNX path -> torch module name (see ``peftjax.io``).
      save_embedding_layers: see :func:`saves_embeddings`.

    Returns:
      ``{PEFT key: float32 array in torch layout}`` (integer positions in the type PEFT saves them).
    """
    save_embeddings = saves_embeddings(config, save_embedding_layers)
    bias = getattr(config, "bias", "none")
    out: dict[str, np.ndarray] = {}
    modules = named_modules(model)
    inside_saved = inside_saved_modules(modules)
    for name, module in modules.items():
        if name in inside_saved:  # saved whole with the module's trained copy
            continue
        path = PREFIX + map_name(name, key_mapping)
        targeted = isinstance(module, layer_type) and adapter_name in module.adapter_names()
        if targeted:
            for suffix, value in module.peft_tensors(adapter_name).items():
                # integer positions keep the type their layer gives (PEFT's: SHiRA int32, UniLoRA int64)
                out[f"{path}.{suffix}"] = value if np.issubdtype(value.dtype, np.integer) else np.asarray(value,
                                                                                                        np.float32)
            if save_embeddings and name.split(".")[-1] in EMBEDDING_LAYER_NAMES:
                out[f"{path}.base_layer.weight"] = module_params_torch(module)["weight"]
        if isinstance(module, SavedModule) and adapter_name in module.modules_to_save:
            # saved as the plain module's keys, without modules_to_save.<name> (reference §1.4)
            for k, v in hf_state_dict(module.modules_to_save[adapter_name]).items():
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
      AdapterFileError: a tensor is not a float tensor (but SHiRA's and PaCA's integer positions), or has the
        wrong shape (names the key).
    """
    for key, value in tensors.items():
        if key.rsplit(".", 1)[-1] in INTEGER_TENSORS:
            continue  # its layer checks it
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
            raise AdapterFileError(f"{source}: {key}: expected a float tensor, found dtype {value.dtype}")
    used: set[str] = set()
    missing: list[str] = []
    # keys without the prefix are accepted too, as PEFT accepts them from inject_adapter_in_model
    by_prefix = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}
    modules = named_modules(model)
    inside_saved = inside_saved_modules(modules)
    for name, module in modules.items():
        if not name or name in inside_saved:
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
            parts = ("modules_to_save", "original_module")
            wrapped = {part: {k[len(part) + 1:]: v for k, v in own.items() if k.startswith(part + ".")}
                       for part in parts}
            direct = {k: v for k, v in own.items() if not k.startswith(tuple(f"{p}." for p in parts))}
            copy = module.modules_to_save[adapter_name]
            for k in set_tree_params_torch(copy, {**wrapped["modules_to_save"], **direct}, f"{source}: {PREFIX}{path}"):
                if k in direct:
                    used.add(f"{path}.{k}")
                if k in wrapped["modules_to_save"]:
                    used.add(f"{path}.modules_to_save.{k}")
            used.update(f"{path}.original_module.{k}" for k in set_tree_params_torch(
                module, wrapped["original_module"], f"{source}: {PREFIX}{path}.original_module"))
        elif "bias" in own and isinstance(getattr(module, "bias", None), nnx.Param):
            # bias="all" saves the biases of untargeted modules under their plain names
            set_module_params_torch(module, {"bias": own["bias"]}, f"{source}: {PREFIX}{path}")
            used.add(f"{path}.bias")
    unexpected = sorted(PREFIX + k for k in by_prefix if k not in used)
    if unexpected:
        warnings.warn(f"{source}: ignored {len(unexpected)} keys that match no adapter layer: {unexpected[:10]}",
                      stacklevel=3)
    return missing, unexpected


def module_params_torch(module: nnx.Module) -> dict[str, np.ndarray]:
    """One module's own base weights in torch names and layouts (``{"weight": ..., "bias": ...}``)."""
    out = {}
    for attr, (name, transpose) in hf_param_map(module).items():
        var = getattr(module, attr, None)
        if isinstance(var, nnx.Param):
            value = np.asarray(var.get_value())
            out[name] = value.T if transpose and value.ndim == 2 else value
    return out


def set_module_params_torch(module: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> None:
    """Sets one module's base weights from torch names and layouts, checking shapes."""
    for attr, (name, transpose) in hf_param_map(module).items():
        var = getattr(module, attr, None)
        if name in tensors and isinstance(var, nnx.Param):
            _set_torch(var, tensors[name], transpose, f"{source}.{name}")


def set_tree_params_torch(module: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> list[str]:
    """Sets the weights of ``module`` and its sub-modules from torch keys relative to it (``weight``,
    ``dense.bias``: what :func:`peftjax.models.hf_state_dict` of the module gives), checking
    shapes; returns the keys it set."""
    used = []
    for key, var, transpose in iter_hf_params(module):
        if key in tensors:
            _set_torch(var, tensors[key], transpose, f"{source}.{key}")
            used.append(key)
    return used


def _set_torch(var, value, transpose: bool, where: str) -> None:
    value = np.asarray(value)
    value = value.T if transpose and value.ndim == 2 else value
    current = var.get_value()
    if value.shape != current.shape:
        shown = tuple(reversed(current.shape)) if transpose and current.ndim == 2 else current.shape
        found = tuple(reversed(value.shape)) if transpose and value.ndim == 2 else value.shape
        raise AdapterFileError(f"{where}: expected shape {list(shown)}, found {list(found)}")
    var.set_value(jnp.asarray(value, current.dtype))


def inside_saved_modules(modules: Mapping[str, nnx.Module]) -> set[str]:
    """The names of modules inside a ``modules_to_save`` module (whose copy carries them whole)."""
    saved = [n for n, m in modules.items() if isinstance(m, SavedModule)]
    return {n for n in modules if any(n.startswith(f"{s}.") for s in saved if s)}


def load_model_tensor(tensors: dict, key: str, variable: nnx.Variable, source: str, what: str, layout: str) -> None:
    """Pops the model-level tensor ``key`` (weights a method shares across layers: VB-LoRA's bank,
    Uni-LoRA's vector, TinyLoRA's group vectors) from ``tensors`` into ``variable``, float32.

    Raises:
      AdapterFileError: the key is missing (says it is ``what``), or its shape differs (``layout``
        names the expected dimensions).
    """
    if key not in tensors:
        raise AdapterFileError(f"{source}: {key} ({what}) is missing")
    found = np.asarray(tensors.pop(key))
    expected = variable.get_value().shape
    if found.shape != expected:
        raise AdapterFileError(f"{source}: {key}: expected shape {list(expected)} ({layout}), found {list(found.shape)}")
    variable.set_value(jnp.asarray(found, jnp.float32))


def with_model_tensors(layer_type: type, model_tensors: Callable) -> tuple[Callable, Callable]:
    """A layer method's ``(state_dict, load_state_dict)`` when it also keeps weights at model level
    (shared across layers, saved once): ``model_tensors(model, adapter_name)`` gives
    ``{PEFT key: (variable, what it is, its layout)}``; the layers' own tensors go through
    :func:`layer_state_dict` / :func:`load_layer_state_dict`."""

    def state_dict(model, adapter_name: str, config: PeftConfig, *, key_mapping: KeyMapping = None,
                   save_embedding_layers: bool | str = "auto") -> dict[str, np.ndarray]:
        out = layer_state_dict(model, adapter_name, config, layer_type=layer_type, key_mapping=key_mapping,
                               save_embedding_layers=save_embedding_layers)
        for key, (variable, _, _) in model_tensors(model, adapter_name).items():
            out[key] = np.asarray(variable.get_value(), np.float32)
        return out

    def load_state_dict(model, tensors: Mapping[str, np.ndarray], adapter_name: str, *,
                        key_mapping: KeyMapping = None, source: str = "adapter") -> tuple[list[str], list[str]]:
        tensors = dict(tensors)
        for key, (variable, what, layout) in model_tensors(model, adapter_name).items():
            load_model_tensor(tensors, key, variable, source, what, layout)
        return load_layer_state_dict(model, tensors, adapter_name, layer_type=layer_type, key_mapping=key_mapping,
                                     source=source)

    return state_dict, load_state_dict
