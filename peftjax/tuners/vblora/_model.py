"""Putting VB-LoRA into an NNX model: one shared vector bank, the per-layer logits, PEFT's file layout."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import VBLoRAConfig
from peftjax.io._adapter import AdapterFileError, KeyMapping
from peftjax.tuners.base import AdapterParam, adapter_layers, inject_each_layer, layer_state_dict, load_layer_state_dict
from peftjax.tuners.base import load_model_tensor
from peftjax.tuners.vblora._layer import VBLoRALayer, VBLoRASpec, vblora_class_for

BANK_KEY = "base_model.vblora_vector_bank"  # PEFT: ``base_model.vblora_vector_bank.<adapter>`` in memory
LOGITS = ("vblora_logits_A", "vblora_logits_B")


def inject_vblora(
    model: nnx.Module, config: VBLoRAConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> VBLoRAConfig:
    """Adds VB-LoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; targets are ``nnx.Linear`` layers (GPT-2's ``Conv1D`` included).
      config: the VB-LoRA settings; ``target_modules=None`` uses PEFT's VB-LoRA table for the model type.
      adapter_name: the name the bank and logits are stored under.
      key: draws the bank (uniform in ``+-init_vector_bank_bound``) and the logits (normal,
        ``init_logits_std``).

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; ``vector_length`` does not divide a layer's
        input or output size (PEFT's message, naming the layer); the adapter already exists.
      TypeError: a target is not a linear layer, or carries another method's adapter.
      NotImplementedError: the model stacks its layers (``scan_layers=True``): the bank is shared
        by all layers, not stacked per layer.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_vblora(model, peftjax.VBLoRAConfig(r=4, vector_length=16, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.vblora_logits_A["default"].shape  # doctest: +SKIP
    (4, 2, 256)
    """
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            "VB-LoRA on a model built with scan_layers=True is not implemented (its vector bank is shared by all "
            "layers, not stacked per layer); load the model with scan_layers=False")
    key = jax.random.key(0) if key is None else key
    length, std, n = config.vector_length, config.init_logits_std, config.num_vectors
    spec = VBLoRASpec(r=config.r, topk=config.topk, dropout=float(config.vblora_dropout))
    targets: list[str] = []
    banks: list[AdapterParam] = []  # one for the model, made with the first layer

    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        if n_in % length != 0:
            raise ValueError(f"{name}: `in_features` {n_in} must be divisible by `vector_length` {length}")
        if n_out % length != 0:
            raise ValueError(f"{name}: `out_features` {n_out} must be divisible by `vector_length` {length}")
        targets.append(name)

    def add(module, _, layer_key):
        if not banks:  # the layers' keys are folded with 0 .. len - 1
            bound = config.init_vector_bank_bound
            banks.append(AdapterParam(jax.random.uniform(jax.random.fold_in(key, len(targets)), (n, length),
                                                         jnp.float32, -bound, bound)))
        n_in, n_out = module.kernel.get_value().shape
        ka, kb = jax.random.split(layer_key)
        module.add_vblora(adapter_name, spec, banks[0], std * jax.random.normal(ka, (config.r, n_in // length, n)),
                          std * jax.random.normal(kb, (n_out // length, config.r, n)))

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=VBLoRALayer,
                             method="VB-LoRA", class_for=vblora_class_for, prepare=prepare, add=add, conv1d=True)


def _indices_dtype(num_vectors: int):
    """PEFT's smallest index type for ``num_vectors``."""
    return np.uint8 if num_vectors < 2**8 else np.int16 if num_vectors < 2**15 else \
        np.int32 if num_vectors < 2**31 else np.int64


def vblora_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: VBLoRAConfig,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """PEFT's on-disk dict: every layer's logits (with ``save_only_topk_weights``: each row's top-k
    indices and the first ``k - 1`` softmax weights) and the bank once."""
    out = layer_state_dict(model, adapter_name, config, layer_type=VBLoRALayer, key_mapping=key_mapping,
                           save_embedding_layers=save_embedding_layers)
    if config.save_only_topk_weights:  # on the host: no XLA program per logits shape
        for key in [k for k in out if k.rsplit(".", 1)[-1] in LOGITS]:
            logits = out.pop(key)
            indices = np.argsort(-logits, axis=-1, kind="stable")[..., : config.topk]  # descending, as torch.topk
            values = np.take_along_axis(logits, indices, axis=-1)
            weights = np.exp(values - values[..., :1])  # the first is the largest
            out[key + "_topk_indices"] = indices.astype(_indices_dtype(config.num_vectors))
            out[key + "_topk_weights"] = (weights / weights.sum(-1, keepdims=True))[..., :-1].astype(np.float32)
    layer = next(iter(adapter_layers(model, VBLoRALayer, adapter_name).values()))
    out[BANK_KEY] = np.asarray(layer.vblora_vector_bank[adapter_name].get_value(), np.float32)
    return out


def load_vblora_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Fills an injected VB-LoRA adapter from PEFT's keys: the bank, and every layer's logits, rebuilt
    as PEFT rebuilds them from top-k files (``log`` of the weights at the indices, ``-inf`` elsewhere).

    Raises:
      AdapterFileError: the bank is missing or has the wrong shape; a top-k file lacks its weights.
    """
    tensors = dict(tensors)
    layer = next(iter(adapter_layers(model, VBLoRALayer, adapter_name).values()))
    bank = layer.vblora_vector_bank[adapter_name]
    load_model_tensor(tensors, BANK_KEY, bank, source, "the shared vector bank", "[num_vectors, vector_length]")
    num_vectors = bank.get_value().shape[0]
    for key in [k for k in tensors if k.endswith("_topk_indices")]:
        weights_key = key.replace("_topk_indices", "_topk_weights")
        if weights_key not in tensors:
            raise AdapterFileError(f"{source}: {key} has no {weights_key}")
        indices = np.asarray(tensors.pop(key)).astype(np.int64)
        weights = np.asarray(tensors.pop(weights_key), np.float32)
        weights = np.concatenate([weights, 1 - weights.sum(-1, keepdims=True)], axis=-1)
        logits = np.full((*indices.shape[:-1], num_vectors), -np.inf, np.float32)
        np.put_along_axis(logits, indices, np.log(weights), axis=-1)
        tensors[key.removesuffix("_topk_indices")] = logits
    return load_layer_state_dict(model, tensors, adapter_name, layer_type=VBLoRALayer, key_mapping=key_mapping,
                                 source=source)
