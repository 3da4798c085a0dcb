"""Putting RandLoRA into an NNX model: the shared bases, the per-layer scales, PEFT's file layout."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import RandLoraConfig
from peftjax.io._adapter import AdapterFileError, KeyMapping
from peftjax.tuners.base import adapter_layers, inject_each_layer, layer_state_dict, load_layer_state_dict
from peftjax.tuners.randlora._bases import randlora_bases
from peftjax.tuners.randlora._layer import RandLoraBasis, RandLoraLayer, RandLoraSpec, randlora_class_for

# the model-level keys of the shared bases (PEFT: ``base_model.randlora_A.<adapter>`` in memory)
BASIS_KEYS = ("base_model.randlora_A", "base_model.randlora_B")
_LAYER_BASES = (".randlora_A", ".randlora_B")  # the copies under each layer (PEFT before 0.22 wrote them)


def inject_randlora(
    model: nnx.Module, config: RandLoraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> RandLoraConfig:
    """Adds RandLoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets are ``nnx.Linear`` layers (GPT-2's ``Conv1D`` included).
      config: the RandLoRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the scales and bases are stored under.
      key: the init key for ``init_weights=False`` (``lambda`` standard normal). The bases come
        from ``projection_prng_key``, exactly PEFT's.

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; another RandLoRA adapter on the model has a
        different ``projection_prng_key`` or ``save_projection`` (PEFT's rule); the adapter exists.
      TypeError: a target is not a linear layer, or carries another method's adapter.
      NotImplementedError: the model stacks its layers (``scan_layers=True``): the bases are shared
        by all layers, not stacked per layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_randlora(model, peftjax.RandLoraConfig(r=8, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.randlora_lambda["default"].shape  # doctest: +SKIP
    (8, 4)
    """
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            "RandLoRA on a model built with scan_layers=True is not implemented (its bases are shared by all "
            "layers, not stacked per layer); load the model with scan_layers=False")
    # PEFT's rule: every adapter on the model draws its bases alike
    for layer in adapter_layers(model, RandLoraLayer).values():
        for other in layer.adapter_names():
            spec = layer.spec(other)
            if spec.projection_prng_key != config.projection_prng_key:
                raise ValueError(f"RandLora PRNG initialisation key must be the same for all adapters. Got "
                                 f"config.projection_prng_key={config.projection_prng_key} but adapter {other!r} has "
                                 f"{spec.projection_prng_key}.")
            if spec.save_projection != config.save_projection:
                raise ValueError("RandLora projection weights must be saved for all adapters or none, but got "
                                 f"multiple different values: adapter {other!r} has save_projection="
                                 f"{spec.save_projection}, the new one {config.save_projection}")
        break
    spec = RandLoraSpec(r=config.r, scaling=config.randlora_alpha / config.r, dropout=float(config.randlora_dropout),
                        projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
                        sparse=config.sparse, very_sparse=config.very_sparse)
    shapes: list[tuple[int, int]] = []  # every target's [in, out], gathered before the first layer changes
    bases: list[tuple[RandLoraBasis, RandLoraBasis]] = []  # drawn once, sized by the largest target

    def add(module, _, key):
        if not bases:
            out_max, in_max = max(s[1] for s in shapes), max(s[0] for s in shapes)
            drawn = randlora_bases(config.r, out_max, in_max, config.projection_prng_key, sparse=config.sparse,
                                   very_sparse=config.very_sparse)
            bases.append(tuple(RandLoraBasis(jnp.asarray(b)) for b in drawn))
        module.add_randlora(adapter_name, spec, bases[0], key, init_weights=config.init_weights)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=RandLoraLayer,
                             method="RandLoRA", class_for=randlora_class_for, conv1d=True, add=add,
                             prepare=lambda _, __, module: shapes.append(module.kernel.get_value().shape))


def randlora_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: RandLoraConfig,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """PEFT 0.22's on-disk dict: every layer's scales and, with ``save_projection``, the bases once,
    under the model (PEFT before 0.22 also wrote them under every layer)."""
    out = layer_state_dict(model, adapter_name, config, layer_type=RandLoraLayer, key_mapping=key_mapping,
                           save_embedding_layers=save_embedding_layers)
    out = {k: v for k, v in out.items() if not k.endswith(_LAYER_BASES)}
    if config.save_projection:
        layer = next(iter(adapter_layers(model, RandLoraLayer, adapter_name).values()))
        for key, store in zip(BASIS_KEYS, (layer.randlora_A, layer.randlora_B)):
            out[key] = np.asarray(store[adapter_name].get_value(), np.float32)
    return out


def load_randlora_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Fills an injected RandLoRA adapter from PEFT's keys; with ``save_projection`` the file's bases
    replace the drawn ones. PEFT 0.22 writes them once, under the model; an older file also holds
    them under every layer, and those copies are checked against the model's.

    Raises:
      AdapterFileError: a model-level basis has the wrong shape or differs from the layers' copies.
    """
    tensors = dict(tensors)
    found = {k: tensors.pop(k) for k in BASIS_KEYS if k in tensors}
    for basis, value in found.items():
        copies = [k for k in tensors if k.endswith(f".{basis.rsplit('.', 1)[1]}")]
        differing = [k for k in copies if not np.array_equal(np.asarray(tensors[k]), np.asarray(value))]
        if differing:
            raise AdapterFileError(f"{source}: {basis} differs from the bases saved under the layers "
                                   f"({differing[:3]})")
        if not copies:  # PEFT 0.22's file: every layer reads the model's bases
            layers = [k.removesuffix(".randlora_lambda") for k in tensors if k.endswith(".randlora_lambda")]
            tensors.update({f"{layer}.{basis.rsplit('.', 1)[1]}": value for layer in layers})
    missing, unexpected = load_layer_state_dict(model, tensors, adapter_name, layer_type=RandLoraLayer,
                                                key_mapping=key_mapping, source=source)
    layer = next(iter(adapter_layers(model, RandLoraLayer, adapter_name).values()))
    for key, store in zip(BASIS_KEYS, (layer.randlora_A, layer.randlora_B)):
        if key not in found:
            continue
        current = store[adapter_name].get_value()
        if tuple(found[key].shape) != current.shape:
            raise AdapterFileError(f"{source}: {key}: expected shape {list(current.shape)} (r and the largest "
                                   f"targeted layer), found {list(found[key].shape)}")
        if not np.array_equal(np.asarray(found[key], np.float32), np.asarray(current)):
            raise AdapterFileError(f"{source}: {key} differs from the bases saved under the layers")
    return missing, unexpected
