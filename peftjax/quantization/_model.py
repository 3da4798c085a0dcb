"""Quantizing a built model's linears, and PEFT's ``prepare_model_for_kbit_training``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.quantization import _bnb
from peftjax.quantization._config import QuantizationConfig
from peftjax.quantization._linear import Linear4bit, Linear8bitLt, QuantizedLinear, QuantizedWeight


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts or name.endswith("." + s) for s in skip)


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def quantize_model(model: nnx.Module, quantization_config) -> nnx.Module:
    """Replaces every ``nnx.Linear`` of ``model`` (but the skipped ones) by a quantized layer, in place.

    Args:
      model: a bundled model (Llama family, BERT), with its weights loaded.
      quantization_config: a :class:`QuantizationConfig`, its dict, or transformers' ``BitsAndBytesConfig``.

    Returns:
      ``model``, whose linears are now :class:`Linear4bit` or :class:`Linear8bitLt`; their float
      kernels are dropped.

    Raises:
      NotImplementedError: a layer type that cannot be quantized yet (GPT-2's ``Conv1D``; stacked
        ``scan_layers`` weights), named.
    """
    config = QuantizationConfig.from_any(quantization_config)
    compute = config.bnb_4bit_compute_dtype or jnp.dtype(getattr(model, "dtype", jnp.float32)).name
    skip = config.skip_modules()
    targets = []
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Linear) or isinstance(module, QuantizedLinear):
            continue
        name = ".".join(str(p) for p in path)
        if _skipped(name, skip):
            continue
        if type(module) is not nnx.Linear:
            raise NotImplementedError(f"{name}: {type(module).__name__} layers cannot be quantized yet "
                                      f"(only nnx.Linear); add it to llm_int8_skip_modules to keep it in float")
        if module.kernel.get_value().ndim != 2:
            raise NotImplementedError(f"{name}: stacked weights (scan_layers=True) cannot be quantized yet; "
                                      f"load without scan_layers")
        targets.append((tuple(path), name, module))
    for path, name, module in targets:
        w = np.asarray(module.kernel.get_value()).astype(np.float32).T  # torch layout [out, in]
        bias = module.bias.get_value() if module.bias is not None else None
        if config.load_in_4bit:
            q = _bnb.quantize_4bit(w, quant_type=config.bnb_4bit_quant_type,
                                   compress_statistics=config.bnb_4bit_use_double_quant)
            new = Linear4bit(q, bias, compute_dtype=compute, path=name)
        else:
            cb, scb = _bnb.int8_vectorwise_quant(w)
            new = Linear8bitLt(cb, scb, bias, compute_dtype=compute, path=name)
        parent = model
        for key in path[:-1]:
            parent = _child(parent, key)
        if isinstance(path[-1], int):
            parent[path[-1]] = new
        else:
            setattr(parent, path[-1], new)
    return model


def quantized_linears(model: nnx.Module) -> dict[str, QuantizedLinear]:
    """``{dotted path: layer}`` of the model's quantized linears."""
    return {".".join(str(p) for p in path): m for path, m in nnx.iter_graph(model) if isinstance(m, QuantizedLinear)}


def quantized_bytes(model: nnx.Module) -> int:
    """Resident bytes of all quantized storage (codes, scales, nested scales)."""
    return sum(int(v.get_value().nbytes) for _, v in nnx.iter_graph(model) if isinstance(v, QuantizedWeight))


def prepare_model_for_kbit_training(model: nnx.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs=None) -> nnx.Module:
    """PEFT's ``prepare_model_for_kbit_training``: float16/bfloat16 base parameters to float32, remat on.

    Freezing needs nothing here: the base is frozen by construction (only adapter variables are
    trained, ``peftjax.TRAINABLE``), and the quantized weights are not parameters at all. As PEFT,
    the non-quantized parameters (norms, embeddings, biases, ``lm_head``) are cast to float32.
    With ``use_gradient_checkpointing``, every decoder layer is rematerialized in the backward pass
    (``remat="full"``), PEFT's gradient checkpointing.
    """
    del gradient_checkpointing_kwargs
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and not isinstance(var, QuantizedWeight):
            value = var.get_value()
            if value.dtype in (jnp.float16, jnp.bfloat16):
                var.set_value(value.astype(jnp.float32))
    if use_gradient_checkpointing:
        found = False
        for _, module in nnx.iter_graph(model):
            if isinstance(module, nnx.Module) and hasattr(module, "remat") and isinstance(module.remat, str):
                module.remat = "full"
                found = True
        if not found:
            raise ValueError(f"{type(model).__name__} has no layer stack with a remat option; "
                             "pass use_gradient_checkpointing=False")
    return model
