"""Quantizing a built model's linears, and PEFT's ``prepare_model_for_kbit_training``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.quantization import _bnb, _checkpoint
from peftjax.quantization._config import QuantizationConfig
from peftjax.quantization._linear import Linear4bit, Linear8bitLt, QuantizedLinear, QuantizedWeight


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts or name.endswith("." + s) for s in skip)


def _child(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _stacked(model) -> bool:
    from peftjax.nn._scan import has_stacked_layers

    return has_stacked_layers(model)


def _unstacked(model, *, write: bool):
    from peftjax.nn._scan import unstacked

    return unstacked(model, write=write)


def _torch_weight_transposed(module: nnx.Module) -> bool:
    """Whether the layer's torch twin stores ``[out, in]`` (``nn.Linear``) rather than ``[in, out]``
    (transformers' ``Conv1D``, whose layer class says so in its ``hf_param_map``)."""
    rule = getattr(type(module), "hf_param_map", None) or {}
    return rule.get("kernel", ("weight", True))[1]


def _quantizable(module: nnx.Module) -> bool:
    """Whether ``module`` is quantized as transformers quantizes its torch twin.

    A plain ``nnx.Linear`` and GPT-2's ``Conv1D`` (an ``nnx.Linear`` whose torch weight is
    ``[in, out]``): transformers quantizes the transpose of ``Conv1D``'s weight, so its
    bitsandbytes layer (and file) holds ``[out, in]`` like any ``nn.Linear``. The flax kernel of
    both is ``[in, out]``, so both quantize ``kernel.T``.
    """
    return type(module) is nnx.Linear or (isinstance(module, nnx.Linear) and not _torch_weight_transposed(module))


def _targets(model: nnx.Module, config: QuantizationConfig,
             keep_float: tuple[str, ...] = ()) -> list[tuple[tuple, str, nnx.Linear]]:
    """``(path, dotted name, layer)`` of every float ``nnx.Linear`` that ``config`` quantizes."""
    skip = tuple(config.skip_modules()) + keep_float
    targets = []
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Linear) or isinstance(module, QuantizedLinear):
            continue
        name = ".".join(str(p) for p in path)
        if _skipped(name, skip):
            continue
        if not _quantizable(module):
            raise NotImplementedError(f"{name}: {type(module).__name__} layers cannot be quantized yet "
                                      f"(only nnx.Linear and GPT-2's Conv1D); add it to llm_int8_skip_modules "
                                      f"to keep it in float")
        if module.kernel.get_value().ndim != 2:
            raise NotImplementedError(f"{name}: a {module.kernel.get_value().ndim}-D kernel cannot be quantized "
                                      f"(bitsandbytes quantizes 2-D linear weights)")
        targets.append((tuple(path), name, module))
    return targets


def _compute_dtype(model, config: QuantizationConfig) -> str:
    return config.bnb_4bit_compute_dtype or jnp.dtype(getattr(model, "dtype", jnp.float32)).name


def _replace(model, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _record(model, config: QuantizationConfig) -> None:
    """Notes the config on the model's config, as transformers does (``config.quantization_config``)."""
    hf = getattr(getattr(model, "config", None), "hf_config", None)
    if hf is not None:
        hf.quantization_config = config.to_dict()


def quantize_model(model: nnx.Module, quantization_config, *, keep_float=()) -> nnx.Module:
    """Replaces every ``nnx.Linear`` of ``model`` (but the skipped ones) by a quantized layer, in place.

    Args:
      model: a bundled model (Llama family, BERT, GPT-2), with its weights loaded.
      quantization_config: a :class:`QuantizationConfig`, its dict, or transformers' ``BitsAndBytesConfig``.
      keep_float: more module names kept in float, beside ``llm_int8_skip_modules`` (or its default,
        the heads): ``from_pretrained`` keeps the linears the checkpoint lacked (a new pooler), which
        the adapter trains and saves as it saves a new classifier.

    Returns:
      ``model``, whose linears are now :class:`Linear4bit` or :class:`Linear8bitLt`; their float
      kernels are dropped. Layers already quantized are left as they are. The config is recorded
      as ``model.config.quantization_config`` (its dict), which ``save_pretrained`` writes.

    Raises:
      NotImplementedError: a layer type that cannot be quantized yet (a linear subclass other than
        GPT-2's ``Conv1D``), named.
    """
    config = QuantizationConfig.from_any(quantization_config)
    if _stacked(model):  # scan_layers=True: each layer quantized, then stacked again (arrays [L, ...])
        with _unstacked(model, write=True):
            return quantize_model(model, config, keep_float=keep_float)
    compute = _compute_dtype(model, config)
    for path, name, module in _targets(model, config, tuple(keep_float)):
        kernel = module.kernel.get_value()
        bias = module.bias.get_value() if module.bias is not None else None
        _replace(model, path, _quantized_layer(np.asarray(kernel).T, bias, config, compute, name))
    _record(model, config)
    return model


def _quantized_layer(weight: np.ndarray, bias, config: QuantizationConfig, compute: str, name: str) -> nnx.Module:
    """The quantized layer of a torch-layout ``[out, in]`` weight (in the model's parameter dtype)."""
    w = np.asarray(weight, np.float32)  # no copy for a float32 weight
    if config.load_in_4bit:
        q = _bnb.quantize_4bit(w, quant_type=config.bnb_4bit_quant_type,
                               compress_statistics=config.bnb_4bit_use_double_quant)
        return Linear4bit(q, bias, compute_dtype=compute, weight_dtype=weight.dtype, path=name)
    cb, scb = _bnb.int8_vectorwise_quant(w)
    return Linear8bitLt(cb, scb, bias, compute_dtype=compute, path=name)


def load_quantized_linears(model: nnx.Module, tensors, quantization_config, *, checkpoint_prefix,
                           source: str = "checkpoint") -> set[str]:
    """Builds the quantized linears of ``model`` straight from a checkpoint, in place, one at a time.

    Every linear that ``quantization_config`` quantizes and whose checkpoint ``weight`` is stored in
    bitsandbytes' 4-bit or int8 layout (``peftjax.quantization._checkpoint``) becomes a
    :class:`Linear4bit` / :class:`Linear8bitLt` holding those very tensors. A linear stored in
    floating point is read, cast to the model's parameter dtype and quantized right away (what :func:`quantize_model` would make of it, bit for bit),
    so the host holds the quantized layers plus one float weight, never the float model. Linears
    the checkpoint lacks are left for the float loader (and :func:`quantize_model`).

    Args:
      model: a bundled model, typically built abstractly (``nnx.eval_shape``).
      tensors: the checkpoint (torch keys).
      quantization_config: what the model is to hold; each stored layer must be in that format.
      checkpoint_prefix: ``model's torch name -> the checkpoint's`` (``base_model_prefix`` alignment);
        ``None`` for a module the checkpoint lacks.
      source: names the checkpoint in errors.

    Returns:
      The checkpoint keys consumed (the layers' quantized storage, or float ``weight``). Their
      biases are left in ``tensors``: the model's float loader sets them as every other weight.

    Raises:
      QuantStateError: a stored layer whose quant state lacks a tensor or does not fit, or whose
        format differs from ``quantization_config``'s; the message names the module and the key.
      CheckpointError: a float weight of the wrong shape or dtype (key and shapes named).
    """
    config = QuantizationConfig.from_any(quantization_config)
    compute = _compute_dtype(model, config)
    dtype = jnp.dtype(getattr(model, "param_dtype", jnp.float32))
    consumed: set[str] = set()
    for path, name, module in _targets(model, config):
        prefix = checkpoint_prefix(name)
        if prefix is None:
            continue
        stored = _checkpoint.stored_format(tensors, prefix)
        in_features, out_features = module.kernel.get_value().shape
        if stored is None:
            if f"{prefix}.weight" in tensors:
                _replace(model, path, _quantize_from_checkpoint(module, tensors, prefix, config, compute, name, source))
                consumed.add(f"{prefix}.weight")
            continue
        if stored != ("4bit" if config.load_in_4bit else "int8"):
            raise _checkpoint.QuantStateError(
                f"{source}: {prefix} is stored {'4-bit' if stored == '4bit' else 'int8'}, but the quantization_config asks "
                f"{'4-bit' if config.load_in_4bit else 'int8'}")
        bias = None
        if module.bias is not None:
            if f"{prefix}.bias" not in tensors:
                raise _checkpoint.QuantStateError(f"{source}: {prefix}: missing key '{prefix}.bias'")
            bias = jnp.asarray(tensors[f"{prefix}.bias"], dtype)
        if stored == "4bit":
            quant, weight_dtype = _checkpoint.read_4bit(tensors, prefix, shape=(out_features, in_features),
                                                        source=source)
            if (quant.quant_type, quant.nested) != (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant):
                raise _checkpoint.QuantStateError(
                    f"{source}: {prefix} is stored {quant.quant_type}{' with' if quant.nested else ' without'} double "
                    f"quantization, but the quantization_config asks {config.bnb_4bit_quant_type}"
                    f"{' with' if config.bnb_4bit_use_double_quant else ' without'} it")
            new = Linear4bit(quant, bias, compute_dtype=compute, weight_dtype=weight_dtype, path=name)
        else:
            cb, scb = _checkpoint.read_int8(tensors, prefix, shape=(out_features, in_features), source=source)
            new = Linear8bitLt(cb, scb, bias, compute_dtype=compute, path=name)
        consumed.update(_checkpoint.quantized_keys(tensors, prefix))
        _replace(model, path, new)
    return consumed


def _quantize_from_checkpoint(module, tensors, prefix: str, config: QuantizationConfig, compute: str, name: str,
                              source: str) -> nnx.Module:
    """``module``'s quantized layer from its float checkpoint weight (read once, dropped after)."""
    from peftjax.io._errors import CheckpointError

    key = f"{prefix}.weight"
    kernel = module.kernel.get_value()  # abstract: shape and dtype only
    in_features, out_features = kernel.shape
    transpose = _torch_weight_transposed(module)  # nn.Linear: [out, in]; GPT-2's Conv1D: [in, out]
    expected = (out_features, in_features) if transpose else (in_features, out_features)
    value = tensors[key]
    if tuple(value.shape) != expected:
        raise CheckpointError(f"cannot load {source}: {key}: expected shape {expected}, found {tuple(value.shape)}")
    if not (np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"):
        raise CheckpointError(f"cannot load {source}: {key}: expected a float tensor, found dtype {value.dtype}")
    if value.dtype != kernel.dtype:  # the cast the float loader makes (jnp.asarray to the parameter dtype)
        value = np.asarray(jnp.asarray(value, kernel.dtype))
    weight = value if transpose else value.T  # [out, in]
    del value
    bias = jnp.zeros((out_features,), module.bias.get_value().dtype) if module.bias is not None else None
    return _quantized_layer(weight, bias, config, compute, name)  # the bias is set by the float loader


def quantized_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The quantized linears' tensors in bitsandbytes' checkpoint layout (torch keys; biases not included)."""
    if _stacked(model):  # per-layer keys, as transformers writes them
        with _unstacked(model, write=False):
            return quantized_state_dict(model)
    out: dict[str, np.ndarray] = {}
    for name, layer in quantized_linears(model).items():
        if isinstance(layer, Linear4bit):
            out.update(_checkpoint.write_4bit(name, layer.quant_state(xp=np), layer.weight_dtype))
        else:
            out.update(_checkpoint.write_int8(name, np.asarray(layer.weight.get_value()),
                                              np.asarray(layer.SCB.get_value())))
    return out


def saved_quantization_config(model: nnx.Module) -> dict | None:
    """The ``quantization_config`` that describes the model's quantized linears, for config.json.

    ``None`` without quantized linears. The recorded config (``model.config.quantization_config``)
    supplies the fields the layers cannot tell (``llm_int8_skip_modules``, the threshold); the
    format fields come from the layers themselves, so a file never claims a format it does not hold.

    Raises:
      ValueError: the layers mix formats (4-bit and int8, NF4 and FP4, with and without double
        quantization, several compute dtypes), which one ``BitsAndBytesConfig`` cannot describe.
    """
    layers = quantized_linears(model)
    if not layers:
        return None
    formats = {}
    for name, m in layers.items():
        key = (("4bit", m.quant_type, m.nested) if isinstance(m, Linear4bit) else ("int8",)) + (m.compute_dtype.name,)
        formats.setdefault(key, []).append(name)
    if len(formats) > 1:
        shown = "; ".join(f"{k}: {v[0]}{' and others' if len(v) > 1 else ''}" for k, v in formats.items())
        raise ValueError(f"save_pretrained: the quantized linears mix formats ({shown}); one BitsAndBytesConfig "
                         "cannot describe them")
    (key,) = formats
    recorded = getattr(getattr(getattr(model, "config", None), "hf_config", None), "quantization_config", None)
    base = QuantizationConfig.from_any(recorded) if recorded is not None else None
    # the float linears by name where the recorded config does not name them (a new pooler kept in float: see
    # from_pretrained), so that a reload keeps them in float as they were saved
    skipped = base.llm_int8_skip_modules if base is not None else None
    fields = dict(llm_int8_threshold=base.llm_int8_threshold if base else 6.0,
                  llm_int8_skip_modules=skipped if skipped is not None else _float_linears(model),
                  bnb_4bit_compute_dtype=key[-1])
    if key[0] == "4bit":
        config = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type=key[1], bnb_4bit_use_double_quant=key[2],
                                    **fields)
    else:
        config = QuantizationConfig(load_in_8bit=True, **fields)
    return config.to_dict()


def _float_linears(model) -> tuple[str, ...] | None:
    names = tuple(".".join(map(str, p)) for p, m in nnx.iter_graph(model)
                  if isinstance(m, nnx.Linear) and not isinstance(m, QuantizedLinear))
    return None if all(n.split(".")[-1] in ("lm_head", "score", "classifier") for n in names) else names


def dequantize_model(model: nnx.Module, dtype=None) -> nnx.Module:
    """transformers' ``model.dequantize()``: every quantized linear back to an ``nnx.Linear``, in place.

    The kernel is the weight bitsandbytes dequantizes (or the float kernel a
    ``merge_and_unload(dequantize=True)`` left), cast to ``dtype`` (default: the layer's compute
    dtype); biases are kept. ``model.config.quantization_config`` is removed, so
    ``save_pretrained`` writes a float checkpoint.

    Raises:
      ValueError: a quantized linear still carries adapters (merge or unload them first).
    """
    if _stacked(model):
        with _unstacked(model, write=True):
            return dequantize_model(model, dtype)
    for name, layer in quantized_linears(model).items():
        if type(layer) not in (Linear4bit, Linear8bitLt):
            raise ValueError(f"dequantize_model: {name} still carries adapters ({type(layer).__name__}); "
                             "merge_and_unload(dequantize=True) or unload() them first")
    for path, name, layer in [(tuple(p), ".".join(map(str, p)), m) for p, m in nnx.iter_graph(model)
                              if isinstance(m, QuantizedLinear)]:
        target = jnp.dtype(dtype or layer.compute_dtype)
        kernel = layer.kernel.get_value().astype(target)
        bias = layer.bias
        new = nnx.eval_shape(lambda: nnx.Linear(layer.in_features, layer.out_features, use_bias=bias is not None,
                                                dtype=target, param_dtype=target, rngs=nnx.Rngs(0)))
        new.kernel = nnx.Param(kernel)
        if bias is not None:
            new.bias = nnx.Param(bias.get_value().astype(target))
        _replace(model, path, new)
    hf = getattr(getattr(model, "config", None), "hf_config", None)
    if hf is not None:
        hf.__dict__.pop("quantization_config", None)
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
    (``remat="full"``), PEFT's gradient checkpointing. ``gradient_checkpointing_kwargs`` is
    accepted for PEFT's signature; torch's options (``use_reentrant``) have no JAX counterpart.
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
