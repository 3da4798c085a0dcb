"""X-LoRA for Flax NNX: a mixture of LoRA experts weighed per token and layer, as HF PEFT 0.22.0 computes it.

``inject_xlora`` loads the config's LoRA adapters (``"0"``, ``"1"``, ... from their directories),
numbers the LoRA linear layers in the model's definition order (torch's ``modules()``), and gives
the model a classifier and a mixin whose ``__call__`` runs PEFT's two passes:

1. the *scaling pass*: the model with every adapter weighed ``scaling_pass_value`` (0 by default:
   the base model), its gradient stopped;
2. the classifier on that pass's last hidden states: ``[batch, seq, layers, adapters]`` weights
   (``peftjax.tuners.lora._scalings``), which weigh each adapter's input in the real pass.

``generate`` decodes greedily without a KV cache, as PEFT's X-LoRA does (each step runs both
passes over the whole sequence, compiled once for the longest length).

On disk, as PEFT writes it: ``adapter_config.json`` (the adapters' paths) and the classifier's
``base_model.internal_xlora_classifier.layers.<i>.weight``/``.bias`` (``i``: its index in
PEFT's ``nn.Sequential``, which counts the ReLUs and dropouts), as PEFT 0.22 writes it. PEFT
0.21.2's ``save_pretrained`` dropped every key containing ``.0.``, ``.1.``, ... (it took them for
the adapters' names), so the first layer of its files is missing; such a file is refused by name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import LoraConfig, XLoraConfig, load_config
from peftjax.io._adapter import AdapterFileError, read_adapter_weights
from peftjax.nn._broadcast import along_last
from peftjax.nn._dropout import apply_dropout
from peftjax.nn._init import torch_linear
from peftjax.tuners.base import (
    AdapterLayer,
    AdapterParam,
    ModelLevelAdapter,
    FrozenAdapterParam,
    adapter_from_file,
    mixin_subclass,
    modules_in_definition_order,
    named_modules,
    set_active_adapters,
    set_adapter_trainable,
    validate_adapter_name,
    with_base_signature,
)
from peftjax.tuners.base._generate import greedy_without_cache
from peftjax.tuners.lora._layer import LoraLayer
from peftjax.tuners.lora._scalings import LoraScalings, lora_scalings

CLASSIFIER = "base_model.internal_xlora_classifier."


class XLoraClassifier(nnx.Module):
    """PEFT's ``XLoraClassifier``: linear layers (ReLU and dropout between them) from the hidden
    states to ``[batch, seq, layers, adapters]`` weights, under PEFT's ``nn.Sequential`` indices."""

    def __init__(self, config: XLoraConfig, n_adapters: int, n_layers: int, *, key: jax.Array):
        self.n_adapters, self.n_layers = n_adapters, n_layers
        self.layerwise = bool(config.layerwise_scalings)
        self.softmax = bool(config.enable_softmax)
        self.temperature = float(config.softmax_temperature)
        self.dropout = float(config.xlora_dropout_p)
        out = n_adapters * n_layers if self.layerwise else n_adapters
        sizes = [config.hidden_size] + [config.xlora_size] * (config.xlora_depth - 1) + [out]
        step = 3 if self.dropout > 0 else 2  # Linear, ReLU (, Dropout)
        self.indices = tuple(i * step for i in range(len(sizes) - 1))
        variable = FrozenAdapterParam if config.inference_mode else AdapterParam
        weights = {}
        for n, (index, fan_in, fan_out) in enumerate(zip(self.indices, sizes[:-1], sizes[1:])):
            w, b = torch_linear(jax.random.fold_in(key, n), fan_in, fan_out)
            weights[f"layers.{index}.weight"], weights[f"layers.{index}.bias"] = variable(w), variable(b)
        self.weights = nnx.Dict(weights)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        x = hidden.astype(jnp.float32)
        for n, index in enumerate(self.indices):
            w, b = self.weights[f"layers.{index}.weight"].get_value(), self.weights[f"layers.{index}.bias"].get_value()
            x = x @ w.T + along_last(b, x.ndim)
            if n < len(self.indices) - 1:
                x = apply_dropout(jax.nn.relu(x), self.dropout, f"xlora_classifier.{index}")
        b, s = hidden.shape[:2]
        if not self.layerwise:
            x = jnp.broadcast_to(x[:, :, None, :], (b, s, self.n_layers, self.n_adapters))
        x = x.reshape(b, s, self.n_layers, self.n_adapters)
        return jax.nn.softmax(x / self.temperature, axis=-1) if self.softmax else x


class XLoraModel(ModelLevelAdapter):
    """Mixin for a model carrying an X-LoRA adapter: its ``__call__`` runs the two passes."""

    adapter_state_attrs = ("xlora_classifiers", "xlora_settings", "model_active", "model_disabled")
    stores = ("xlora_classifiers",)
    method = "X-LoRA"
    merge_refusal = "X-LoRA: its weights change with every token, so it cannot be merged"

    def _settings(self, name: str) -> tuple[dict, float]:
        settings = dict(dict(self.xlora_settings)[name])
        return settings, float(settings.pop("scaling_pass_value"))

    def xlora_scalings(self, *args, **kwargs) -> jax.Array:
        """The classifier's weights for a batch (the model's arguments), ``[batch, seq, LoRA layers,
        adapters]``, before top-k: what PEFT's ``get_latest_scalings()`` returns after a forward.

        Raises:
          ValueError: no X-LoRA adapter is active.
        """
        name = self.current_adapter()
        if name is None:
            raise ValueError(f"{type(self).__name__}: no X-LoRA adapter is active (disabled, or none)")
        settings, scan_value = self._settings(name)
        first = {k: v for k, v in kwargs.items() if k != "labels"}
        with lora_scalings(LoraScalings(scan_value, **settings)):
            hidden = self._peftjax_base.__call__(self, *args, **first).last_hidden_state
        if hidden is None:
            raise TypeError(f"{type(self).__name__} returns no last_hidden_state, which X-LoRA's classifier reads")
        return self.xlora_classifiers[name](jax.lax.stop_gradient(hidden))

    def __call__(self, *args, **kwargs):
        base_call = self._peftjax_base.__call__
        name = self.current_adapter()
        if name is None:
            return base_call(self, *args, **kwargs)
        settings, _ = self._settings(name)
        with lora_scalings(LoraScalings(self.xlora_scalings(*args, **kwargs), **settings)):
            return base_call(self, *args, **kwargs)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Greedy decoding without a KV cache, as PEFT's X-LoRA generates: each step scores the
        whole sequence (both passes), so the weights of every position come from its full prefix.

        Raises:
          NotImplementedError: sampling or other generation options (named).
        """
        return greedy_without_cache(self, input_ids, attention_mask, method="X-LoRA", **kwargs)


def _lora_config(path: str, name: str) -> LoraConfig:
    config = load_config(path)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"XLoraConfig.adapters[{name!r}]: {path} holds a {config.peft_type} adapter; X-LoRA "
                         "mixes LoRA adapters")
    if config.use_dora:
        raise ValueError(f"XLoraConfig.adapters[{name!r}]: {path} is a DoRA adapter; X-LoRA does not support DoRA "
                         "(PEFT's message: X-LoRA currently does not support LoRA layers with DoRA)")
    return config


def inject_xlora(model: nnx.Module, config: XLoraConfig, *, adapter_name: str = "default",
                 key: jax.Array | None = None) -> XLoraConfig:
    """Loads the config's LoRA adapters into ``model`` and adds X-LoRA adapter ``adapter_name``, in place.

    Returns:
      The config, ``hidden_size`` filled from the model where it was unset.

    Raises:
      ValueError: no adapters, an adapter that is not LoRA (or is DoRA), a LoRA on layers X-LoRA
        does not weigh here (embeddings, convolutions, parameters), a ``hidden_size`` other than
        the model's, or a second X-LoRA adapter.
      AdapterFileError: an adapter's file does not fit the model.
    """
    from peftjax.tuners._registry import tuner_for

    validate_adapter_name(adapter_name)
    if not config.adapters:
        raise ValueError("XLoraConfig.adapters is empty: name the LoRA adapters to mix ({'0': path, '1': path, ...})")
    if isinstance(model, XLoraModel):
        raise ValueError(f"{type(model).__name__} already carries X-LoRA adapter {model.adapter_names()}; "
                         "one per model is supported")
    XLoraModel.refuse_another_method(model)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if config.hidden_size is None:
        config = dataclasses.replace(config, hidden_size=width)
    if width is not None and config.hidden_size != width:
        raise ValueError(f"XLoraConfig.hidden_size={config.hidden_size}, but the model's hidden size is {width}")
    configs = {name: _lora_config(path, name) for name, path in config.adapters.items()}
    taken = [n for n in configs if any(n in getattr(m, "adapter_names", lambda: ())()
                                       for m in named_modules(model).values() if isinstance(m, AdapterLayer))]
    if taken:
        raise ValueError(f"the model already has adapters named {taken}; X-LoRA loads its LoRA adapters under "
                         "those names")
    tensors = {name: read_adapter_weights(path) for name, path in config.adapters.items()}
    frozen = config.inference_mode or not config.use_trainable_adapters
    for name, lora in configs.items():
        tuner = tuner_for(lora)
        with adapter_from_file():
            tuner.inject(model, dataclasses.replace(lora, inference_mode=frozen), adapter_name=name,
                         key=jax.random.key(0))
        missing, unexpected = tuner.load_state_dict(model, tensors[name], name, key_mapping=None,
                                                    source=config.adapters[name])
        if missing or unexpected:
            raise AdapterFileError(f"{config.adapters[name]}: the LoRA file does not fit the model (missing "
                                   f"{missing[:4]}, unexpected {unexpected[:4]})")
        if frozen:
            set_adapter_trainable(model, name, False)
    modules = named_modules(model)
    layers = [p for p in modules_in_definition_order(model)
              if isinstance(modules.get(p), LoraLayer) and set(modules[p].adapter_names()) & set(configs)]
    odd = [p for p in layers if modules[p].lora_kind != "linear"]
    if odd:
        raise ValueError(f"X-LoRA weighs LoRA linear layers here; the adapters also adapt {odd[:4]} "
                         f"({modules[odd[0]].lora_kind}), which PEFT weighs too but peftjax does not yet")
    for index, path in enumerate(layers):
        modules[path].xlora_index = index
    set_active_adapters(model, ())  # X-LoRA weighs the adapters itself, whatever is active
    classifier = XLoraClassifier(config, len(configs), len(layers), key=jax.random.key(0) if key is None else key)
    model.__class__ = with_base_signature(mixin_subclass(type(model), XLoraModel, ""), XLoraModel.__call__)
    model.xlora_classifiers = nnx.Dict({adapter_name: classifier})
    # (name, settings as sorted pairs): hashable, as static graph data must be
    settings = dict(adapters=tuple(configs), top_k=config.top_k_lora, softmax_top_k=config.enable_softmax_topk,
                    weight=float(config.global_scaling_weight), scaling_pass_value=float(config.scaling_pass_value))
    model.xlora_settings = ((adapter_name, tuple(sorted(settings.items()))),)
    model.model_active, model.model_disabled = (adapter_name,), False
    return config


def xlora_state_dict(model, adapter_name: str, config, *, key_mapping=None, save_embedding_layers="auto"):
    """``base_model.internal_xlora_classifier.layers.<i>.weight``/``.bias``: the classifier, as PEFT keys it."""
    del config, key_mapping, save_embedding_layers
    classifier = model.xlora_classifiers[adapter_name]
    return {CLASSIFIER + k: np.asarray(v.get_value(), np.float32) for k, v in classifier.weights.items()}


def load_xlora_state_dict(model, tensors, adapter_name: str, *, key_mapping=None, source: str = "adapter"):
    """Fills the classifier; a file without all its layers (PEFT 0.21.2's saves) is refused.

    Raises:
      AdapterFileError: a classifier key is missing or has the wrong shape.
    """
    del key_mapping
    classifier = model.xlora_classifiers[adapter_name]
    wanted = {CLASSIFIER + k: v for k, v in classifier.weights.items()}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise AdapterFileError(
            f"{source}: the X-LoRA classifier's {missing} are not in the file (found {sorted(tensors)[:6]}). PEFT "
            "0.21.2's save_pretrained dropped every key containing '.0.', '.1.', ... (it took them for the LoRA "
            "adapters' names), so its files lack the classifier's first layer; save it again with PEFT >= 0.22, "
            "or save the classifier's state dict under these keys")
    for k, var in wanted.items():
        value = np.asarray(tensors[k])
        if value.shape != tuple(var.get_value().shape):
            raise AdapterFileError(f"{source}: {k}: expected shape {list(var.get_value().shape)} (hidden_size, "
                                   f"xlora_size, xlora_depth, the adapters and LoRA layers), found {list(value.shape)}")
        var.set_value(jnp.asarray(value, jnp.float32))
    return [], sorted(set(tensors) - set(wanted))

