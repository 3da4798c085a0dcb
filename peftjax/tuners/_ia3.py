"""(IA)³ for Flax NNX: learned vectors that rescale a layer's output or its input.

A targeted ``nnx.Linear`` (GPT-2's ``Conv1D`` included) keeps its ``kernel`` and ``bias`` and gains
one vector per adapter name (``k_proj/ia3_l/default``), as in HF PEFT 0.21
(``peft/tuners/ia3/layer.py``; reference §3.3):

- an attention-type module scales its **output**, ``y = base(x) * l`` with ``l: [out]``, the bias
  included;
- a feedforward module (``feedforward_modules``) scales its **input**, ``y = base(x * l)`` with
  ``l: [in]``.

Several active adapters multiply their vectors. The vectors start at ones (a no-op adapter), or at
N(0, 1) with ``init_ia3_weights=False``, like PEFT's ``torch.randn``.

``merge`` folds ``l`` into the kernel (``[in, out]`` here): columns for an attention-type module
(and the bias), rows for a feedforward one. ``unmerge`` divides by ``l + 1e-8`` and is therefore
approximate; it warns as PEFT does.

On disk (PEFT's keys): ``base_model.model.<path>.ia3_l``, shaped ``[out, 1]`` (attention-type) or
``[1, in]`` (feedforward), for ``nn.Linear`` and ``Conv1D`` alike.

This module also holds :class:`AdapterDictLayer` and the generic state-dict functions that any
method keeping its weights in per-name ``nnx.Dict`` entries reuses (the bottleneck adapters do).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    IA3Config,
    is_feedforward_module,
    match_modules,
    resolve_target_modules,
)
from peftjax.io._adapter import EMBEDDING_LAYER_NAMES, KeyMapping
from peftjax.io._layer_format import layer_state_dict, load_layer_state_dict
from peftjax.tuners._base_layer import AdapterLayer
from peftjax.tuners._lora import (
    _match_modules_to_save,
    _model_type,
    _stores_in_out,
    add_saved_copy,
    named_modules,
    resolve_config,
    validate_adapter_name,
)
from peftjax.tuners._lora_nnx import mixin_subclass
from peftjax.tuners._variables import LoraParam

# ------------------------------------------------------------------ layers with per-name weight dicts


class AdapterDictLayer(AdapterLayer):
    """The bookkeeping of a layer whose adapter weights are per-name ``nnx.Dict`` entries.

    Subclasses name their weight containers in ``weight_dicts`` and map them to PEFT's key
    suffixes and torch layouts in ``peft_layout``. Like every mixin applied by ``mixin_subclass``,
    methods reach the original layer through ``self._peftjax_base``, never ``super()``.
    """

    method_name: str = "adapter"
    weight_dicts: tuple[str, ...] = ()
    adapter_state_attrs = ("adapter_path", "adapter_specs", "adapter_active", "adapter_merged", "adapter_disabled")

    def _adapter_setup(self, path: str) -> None:
        if not hasattr(self, "adapter_specs"):
            self.adapter_path = path
            self.adapter_specs = ()
            self.adapter_active = ()
            self.adapter_merged = ()
            self.adapter_disabled = False
            for attr in self.weight_dicts:
                setattr(self, attr, nnx.Dict())

    def remove_adapter_state(self) -> None:
        for attr in self.adapter_state_attrs + self.weight_dicts:
            if hasattr(self, attr):
                delattr(self, attr)

    def spec(self, name: str):
        return dict(self.adapter_specs)[name]

    def _live_adapters(self) -> list[tuple[str, object]]:
        if self.adapter_disabled:
            return []
        specs = dict(self.adapter_specs)
        return [(n, specs[n]) for n in self.adapter_active if n in specs and n not in self.adapter_merged]

    # AdapterLayer
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.adapter_specs)

    def set_active_adapters(self, names: tuple[str, ...]) -> None:
        own = self.adapter_names()
        self.adapter_active = tuple(n for n in names if n in own)

    def set_adapters_disabled(self, disabled: bool) -> None:
        self.adapter_disabled = disabled

    def active_adapter_names(self) -> tuple[str, ...]:
        return self.adapter_active

    def merged_adapter_names(self) -> tuple[str, ...]:
        return self.adapter_merged

    def delete_adapter(self, name: str) -> None:
        for d in self.adapter_variable_dicts():
            if name in d:
                del d[name]
        self.adapter_specs = tuple((n, s) for n, s in self.adapter_specs if n != name)
        self.adapter_active = tuple(n for n in self.adapter_active if n != name)

    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        return tuple(getattr(self, attr) for attr in self.weight_dicts)

    def _check_new(self, name: str) -> None:
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} already exists on {self.adapter_path}")

    def _add_spec(self, name: str, spec) -> None:
        self.adapter_specs = self.adapter_specs + ((name, spec),)
        if not self.adapter_active:  # the first adapter on a layer is active, as in PEFT
            self.adapter_active = (name,)

    # PEFT file protocol: ``peft_layout(name)`` gives {key suffix: (variable dict, to_torch, from_torch)}

    def peft_layout(self, name: str) -> dict[str, tuple[nnx.Dict, Callable, Callable]]:
        raise NotImplementedError

    def peft_tensors(self, name: str) -> dict[str, jax.Array]:
        """The adapter's weights as PEFT stores them (torch layouts), by key suffix."""
        return {
            suffix: to_torch(store[name].get_value())
            for suffix, (store, to_torch, _) in self.peft_layout(name).items()
            if name in store
        }

    def load_peft_tensors(self, name: str, tensors: Mapping, source: str) -> list[str]:
        """Sets the adapter's weights from torch-layout tensors, checking shapes.

        Returns:
          The full keys absent from ``tensors`` (those weights keep their init values).

        Raises:
          ValueError: a tensor has the wrong shape (names the key, expected and found shapes).
        """
        missing = []
        for suffix, (store, to_torch, from_torch) in self.peft_layout(name).items():
            if name not in store:
                continue
            key = f"{source}.{suffix}"
            if suffix not in tensors:
                missing.append(key)
                continue
            value = tensors[suffix]
            current = store[name].get_value()
            expected = tuple(to_torch(current).shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"{key}: expected shape {list(expected)} ({self._describe(name)}), found {list(value.shape)}"
                )
            store[name].set_value(jnp.asarray(from_torch(jnp.asarray(value)), current.dtype).reshape(current.shape))
        return missing

    def _describe(self, name: str) -> str:
        return f"{self.method_name} adapter {name!r}"




def check_adaptable(modules: Mapping[str, nnx.Module], targets: list[str], layer_type: type, method: str) -> None:
    """Fails on targets that are not ``nnx.Linear`` or already carry another method's adapter.

    Raises:
      TypeError: a target already has another method's adapter (one method per layer, as in
        PEFT outside ``PeftMixedModel``) or is a layer type the method cannot adapt (names path
        and class).
      NotImplementedError: a target is a convolution / general linear layer, which HF PEFT's
        method may support but peftjax's does not yet.
    """
    mixed = [n for n in targets if isinstance(modules[n], AdapterLayer) and not isinstance(modules[n], layer_type)]
    if mixed:
        listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in mixed[:10])
        raise TypeError(f"{listed} already carry another method's adapter; one method per layer is supported")
    wanted = [n for n in targets if not isinstance(modules[n], nnx.Linear)]
    later = [n for n in wanted if isinstance(modules[n], nnx.Conv | nnx.LinearGeneral | nnx.Einsum)]
    listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in (later or wanted)[:10])
    if later:
        raise NotImplementedError(f"{method} on {listed} is not implemented; supported: nnx.Linear (and subclasses)")
    if wanted:
        raise TypeError(f"{method} cannot adapt {listed}; supported: nnx.Linear (and subclasses such as GPT-2's Conv1D)")


# ------------------------------------------------------------------ IA³


@dataclasses.dataclass(frozen=True)
class IA3Spec:
    """Static settings of one IA³ adapter on one layer.

    Attributes:
      is_feedforward: the input is scaled (``l: [in]``) rather than the output (``l: [out]``).
    """

    is_feedforward: bool


class IA3Layer(AdapterDictLayer):
    """Mixin marking an IA³ layer (``isinstance(m, IA3Layer)`` finds them)."""

    method_name = "IA³"
    weight_dicts = ("ia3_l",)


class IA3Linear(IA3Layer):
    """IA³ on ``nnx.Linear`` and its subclasses (GPT-2's ``Conv1D`` included)."""

    def add_ia3(self, name: str, spec: IA3Spec, key: jax.Array, init: bool = True) -> None:
        self._check_new(name)
        n_in, n_out = self.kernel.get_value().shape
        shape = (n_in,) if spec.is_feedforward else (n_out,)
        value = jnp.ones(shape, jnp.float32) if init else jax.random.normal(key, shape, jnp.float32)
        self.ia3_l[name] = LoraParam(value)
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        # PEFT: [out, 1] for attention-type modules, [1, in] for feedforward ones (Conv1D included)
        shape = (1, -1) if self.spec(name).is_feedforward else (-1, 1)
        return {"ia3_l": (self.ia3_l, lambda vec: vec.reshape(shape), jnp.ravel)}

    def _describe(self, name: str) -> str:
        kind = "feedforward, [1, in]" if self.spec(name).is_feedforward else "attention-type, [out, 1]"
        return f"IA³ {kind}"

    def _product(self, feedforward: bool):
        scale = None
        for name, spec in self._live_adapters():
            if spec.is_feedforward == feedforward:
                vec = self.ia3_l[name].get_value()
                scale = vec if scale is None else scale * vec
        return scale

    def __call__(self, x, *args, **kwargs):
        scale_in, scale_out = self._product(True), self._product(False)
        if scale_in is not None:  # PEFT: (x.to(l.dtype) * l).to(x.dtype)
            x = (x.astype(scale_in.dtype) * scale_in).astype(x.dtype)
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        if scale_out is not None:
            y = (y * scale_out).astype(y.dtype)
        return y

    def merge_adapter(self, name: str) -> None:
        """Folds ``l`` into the kernel: rows (inputs) if feedforward, else columns and the bias."""
        self._rescale(name, lambda w, vec: w * vec)
        self.adapter_merged = self.adapter_merged + (name,)

    def unmerge_adapter(self, name: str) -> None:
        """Divides ``l + 1e-8`` back out, as PEFT does: approximate, with PEFT's warning."""
        warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
        self._rescale(name, lambda w, vec: w / (vec + 1e-8))
        self.adapter_merged = tuple(n for n in self.adapter_merged if n != name)

    def _rescale(self, name: str, op) -> None:
        vec = self.ia3_l[name].get_value()
        w = self.kernel.get_value()
        if self.spec(name).is_feedforward:  # PEFT leaves the bias alone: it is added after the scaled input
            self.kernel.set_value(op(w.astype(jnp.float32), vec[:, None]).astype(w.dtype))
            return
        self.kernel.set_value(op(w.astype(jnp.float32), vec[None, :]).astype(w.dtype))
        if self.bias is not None:
            b = self.bias.get_value()
            self.bias.set_value(op(b.astype(jnp.float32), vec).astype(b.dtype))


def ia3_class_for(module: nnx.Module) -> type:
    if isinstance(module, IA3Layer):
        return type(module)
    return mixin_subclass(type(module), IA3Linear, "IA3")


def _resolve_ia3_config(model: nnx.Module, config: IA3Config) -> IA3Config:
    # PEFT fills target_modules and feedforward_modules from the model type independently
    model_type = _model_type(model) or ""
    default_ff = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
    targets = config.target_modules
    if config.feedforward_modules is None and isinstance(targets, tuple) and default_ff is not None:
        extra = sorted(set(default_ff) - set(targets))
        if extra:
            # PEFT accepts this, then saves an adapter_config.json that it refuses to load again
            raise ValueError(
                f"feedforward_modules is None, so it would be PEFT's default for model_type {model_type!r}, "
                f"{sorted(default_ff)}; but {extra} are not in target_modules={list(targets)}, and a config whose "
                "feedforward_modules is not a subset of target_modules cannot be loaded (by PEFT either). Pass "
                "feedforward_modules explicitly: the targeted modules whose input is scaled, or [] for none."
            )
    if config.target_modules is None or config.feedforward_modules is None:
        config = resolve_target_modules(config, model_type)
    return resolve_config(model, config)


def inject_ia3(
    model: nnx.Module, config: IA3Config, *, adapter_name: str = "default", key: jax.Array | None = None
) -> IA3Config:
    """Adds IA³ adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; the targeted layers must be ``nnx.Linear`` (GPT-2's ``Conv1D``
        included).
      config: the IA³ settings. ``target_modules=None`` / ``feedforward_modules=None`` use PEFT's
        default for the model type; a module is feedforward by PEFT's rule
        (:func:`peftjax.config.is_feedforward_module`: a list entry matches any name ending with
        it). ``modules_to_save`` (and the task head for ``SEQ_CLS``) get trainable copies.
      adapter_name: the name under which the vectors are stored (``ia3_l/<name>``).
      key: the init key for ``init_ia3_weights=False`` (a fixed default keeps it deterministic).

    Returns:
      The resolved config (defaults filled in, task heads added, ``fan_in_fan_out`` set as PEFT
      sets it).

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest names are listed), the model
        type has no default, or ``feedforward_modules`` is not a subset of ``target_modules``.
      TypeError: a target is not a linear layer, or already carries another method's adapter.
      NotImplementedError: a target is an ``nnx.Conv`` / ``LinearGeneral`` / ``Einsum`` (PEFT
        supports IA³ on convolutions; peftjax does not yet).

    >>> import peftjax, jax.numpy as jnp  # doctest: +SKIP
    >>> config = inject_ia3(model, peftjax.IA3Config(target_modules=["k_proj", "down_proj"],
    ...                                              feedforward_modules=["down_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.k_proj.ia3_l["default"].shape  # doctest: +SKIP
    (32,)
    """
    validate_adapter_name(adapter_name)
    config = _resolve_ia3_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=_model_type(model))
    check_adaptable(modules, targets, IA3Layer, "IA³")
    in_out = [n for n in targets if _stores_in_out(modules[n])]
    if in_out and not config.fan_in_fan_out:
        warnings.warn(
            f"{in_out[0]} stores its weight as (fan_in, fan_out) like HF's Conv1D; setting fan_in_fan_out=True "
            "as PEFT does",
            stacklevel=2,
        )
        config = dataclasses.replace(config, fan_in_fan_out=True)
    elif not in_out and config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out is set to True but the target modules are linear layers stored (fan_out, fan_in); "
            "setting fan_in_fan_out to False as PEFT does",
            stacklevel=2,
        )
        config = dataclasses.replace(config, fan_in_fan_out=False)
    for i, name in enumerate(targets):
        module = modules[name]
        module.__class__ = ia3_class_for(module)
        module._adapter_setup(name)
        spec = IA3Spec(is_feedforward=is_feedforward_module(config, name))
        module.add_ia3(adapter_name, spec, jax.random.fold_in(key, i), config.init_ia3_weights)
    for name in _match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config


def _saves_embeddings(config, save_embedding_layers) -> bool:
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    targets = config.target_modules
    return not isinstance(targets, str) and any(e in (targets or ()) for e in EMBEDDING_LAYER_NAMES)


def ia3_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: IA3Config,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """The IA³ adapter ``adapter_name`` as PEFT's ``get_peft_model_state_dict`` writes it.

    Keys are ``base_model.model.<path>.ia3_l`` (``[out, 1]`` or ``[1, in]``) plus the whole
    ``modules_to_save`` copies under their plain names (``...classifier.weight``).
    """
    return layer_state_dict(
        model, adapter_name, layer_type=IA3Layer, key_mapping=key_mapping,
        save_embeddings=_saves_embeddings(config, save_embedding_layers),
    )


def load_ia3_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Sets IA³ adapter ``adapter_name`` (already injected) from PEFT's keys; see :func:`load_layer_state_dict`."""
    return load_layer_state_dict(
        model, tensors, adapter_name, layer_type=IA3Layer, key_mapping=key_mapping, source=source
    )
