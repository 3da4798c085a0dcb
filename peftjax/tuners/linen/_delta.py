"""LoHa, LoKr, VeRA, FourierFT and AdaLoRA (and IA³) on a Flax Linen model: one weight-delta path.

Each of these methods defines an update ``ΔW`` (torch layout ``[out, in]``) from its own trained
weights (see :mod:`peftjax.tuners.linen._methods`). Here that is all the Linen side needs:

- :func:`inject` puts the method's weights next to each targeted layer's ``kernel`` in ``params``,
  one entry per adapter name under PEFT's attribute names (``hada_w1_a/<name>``, ...), in PEFT's
  layouts, stacked like the kernel under ``nn.scan``;
- :func:`intercept` makes a targeted layer's ``__call__`` return ``base(x) + x @ ΔW`` (``ΔW`` put
  in the kernel's own layout, so Dense, DenseGeneral and Einsum contract it as they contract the
  kernel), with PEFT's training-time dropouts under ``peftjax.dropout_key``;
- :func:`merge_and_unload` adds ``ΔW`` to the kernels and drops the adapter leaves;
- :func:`save_adapter` / :func:`load_adapter` write and read PEFT's files (``base_model.model.<torch
  name>.<attribute>``, the identity layout; VeRA's shared ``base_model.vera_A`` / ``vera_B``).

The Linen names, scan indices and ``key_mapping`` are LoRA's (``peftjax.tuners.lora._linen``), whose
discovery, file naming and pytree helpers this module reuses; LoRA keeps its own low-rank forward.
Only linear layers (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``: ``torch.nn.Linear`` twins) are
adapted, as PEFT adapts ``nn.Linear`` with these methods (its convolution variants aside).

IA³ is no ``ΔW`` but a rescaling; it shares everything but the forward (:func:`_rescaled`: the input
or the output scaled, as PEFT's ``IA3Layer.forward``) and the merge (rows, or columns and the bias).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import threading
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as flax_meta

from peftjax.config import VeraConfig, expand_all_linear, is_all_linear, load_config, match_modules
from peftjax.io._adapter import PREFIX, AdapterFileError, KeyMapping, adapter_dir, read_adapter_weights, write_adapter
from peftjax.nn._dropout import active_dropout_key, apply_dropout, fold_key, keep_mask
from peftjax.tuners.base import validate_adapter_name
from peftjax.tuners.linen._methods import (
    VeraSettings,
    check_config,
    is_delta_config,
    settings_for,
)
from peftjax.tuners.lora._linen import (
    _LINEAR_KINDS,
    LINEN_KEY_MAPPING,
    AdapterLayersSpec,
    LinenLayerSpec,
    _call_info,
    _fill,
    _file_names,
    _from_2d,
    _get,
    _index_slots,
    _like,
    _linear,
    _over_stack,
    _rebox,
    _set,
    _Slot,
    _stacked_of,
    _to_2d,
    _trace,
    split,
)
from peftjax.tuners.lycoris._layer import rank_dropout_mask

VERA_A_KEY, VERA_B_KEY = "base_model.vera_A", "base_model.vera_B"


@dataclasses.dataclass(frozen=True)
class LinenDeltaLayer(LinenLayerSpec):
    """The weight-delta adapters on one Linen layer: LoRA's layer record (same geometry), its
    ``adapters`` holding each method's settings instead of a ``LoraSpec``; never an embedding."""

    @property
    def n_in_out(self) -> tuple[int, int]:
        return math.prod(self.in_shape), math.prod(self.out_shape)


@dataclasses.dataclass(frozen=True)
class LinenDeltaSpec(AdapterLayersSpec):
    """Which Linen layers carry which LoHa/LoKr/VeRA/FourierFT/AdaLoRA adapters: static, hashable.

    Attributes:
      peft_type: the method (``"LOHA"``, ...); one spec holds adapters of one method, as PEFT's
        model holds one tuner.
      layers: one entry per adapted layer, in discovery order.
      active: the adapters the forward applies.
      scan_axes: as ``LinenLoraSpec.scan_axes`` (places the layer indices in file keys).
      bias: always ``"none"`` (the only value supported here); read by ``split``.
      saved: always ``()`` (no ``modules_to_save`` here); read by ``split``.
    """

    peft_type: str
    layers: tuple[LinenDeltaLayer, ...]
    active: tuple[str, ...]
    scan_axes: tuple[tuple[tuple[str, ...], int], ...] = ()
    bias: str = "none"
    saved: tuple = ()


# --------------------------------------------------------------------------------------------
# Injection


def inject(module: nn.Module, params: Mapping, config, *, sample_args: Sequence[Any] = (),
           sample_kwargs: Mapping[str, Any] | None = None, key: jax.Array, adapter_name: str = "default",
           spec: LinenDeltaSpec | None = None) -> tuple[dict, LinenDeltaSpec]:
    """``peftjax.linen.inject`` for a LoHa/LoKr/VeRA/FourierFT/AdaLoRA config (see there)."""
    validate_adapter_name(adapter_name)
    layers, scan_axes = _trace(module, *sample_args, **(sample_kwargs or {}))
    config = _expand_all_linear(config, {n: i.kind for n, i in layers.items()})
    targets = {name: name for name in match_modules(config, list(layers))}
    return _inject(params, config, layers, scan_axes, targets, key=key, adapter_name=adapter_name, spec=spec)


def _expand_all_linear(config, kinds: Mapping[str, str]):
    if not is_all_linear(getattr(config, "target_modules", None)):
        return config
    linear = [n for n, kind in kinds.items() if kind in _LINEAR_KINDS]
    output = "lm_head" if "lm_head" in kinds else None
    return dataclasses.replace(config, target_modules=tuple(expand_all_linear(linear, output, config.task_type)))


def _inject(params: Mapping, config, layers, scan_axes, targets: Mapping[str, str], *, key: jax.Array | None,
            adapter_name: str, spec: LinenDeltaSpec | None) -> tuple[dict, LinenDeltaSpec]:
    """``targets``: ``{linen name: the name the config's patterns match}``; every check runs first.

    ``key=None`` puts zeros of the init's shapes (no random draws to compile), for a load that
    overwrites every weight."""
    if not is_delta_config(config):
        raise TypeError(f"{type(config).__name__} is not a LoHa/LoKr/VeRA/FourierFT/AdaLoRA config")
    check_config(config)
    method = config.peft_type
    kinds = ("dense", "dense_general") if method == "IA3" else _LINEAR_KINDS  # IA³ scales an einsum's axes: not here
    bad = [layers[n] for n in targets if layers[n].reason is not None or layers[n].kind not in kinds]
    if bad:
        listed = "; ".join(f"{i.name} ({i.cls}): {i.reason or 'not a linear layer'}" for i in bad[:10])
        raise TypeError(f"{method} through peftjax.linen adapts {', '.join(kinds)} layers (torch nn.Linear twins, "
                        f"as PEFT's {method} adapts nn.Linear), not {listed}")
    if spec is not None:
        if spec.peft_type != method:
            raise ValueError(f"the spec holds {spec.peft_type} adapters; a {method} adapter cannot join them "
                             "(one method per model, as in PEFT)")
        if adapter_name in spec.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists; existing: {list(spec.adapter_names)}")
        if isinstance(config, VeraConfig):
            _check_vera_peers(config, spec)
    shapes = {n: (math.prod(layers[n].in_shape), math.prod(layers[n].out_shape)) for n in targets}
    settings = {n: settings_for(config, targets[n], shapes[n], list(shapes.values()), n) for n in targets}
    for name in targets:
        info = layers[name]
        node = _get(params, info.path)
        where = f"params/{'/'.join(info.path)}"
        if not isinstance(node, Mapping) or "kernel" not in node:
            raise ValueError(f"{name}: {where}/kernel is missing; pass the `params` collection of this model")
        found = tuple(jnp.shape(flax_meta.unbox(node["kernel"])))
        if found != info.stacked + info.kernel_shape:
            raise ValueError(f"{where}/kernel: expected shape {list(info.stacked + info.kernel_shape)}, found "
                             f"{list(found)}")
        if any(adapter_name in (node.get(k) or {}) for k in settings[name].keys):
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")

    new_params = params
    new_layers = {layer.name: layer for layer in spec.layers} if spec is not None else {}
    plan = tuple((settings[n], *shapes[n], layers[n].stacked) for n in targets)
    initial = _init_all(plan, key) if key is not None else _zeros(plan)
    for name, weights in zip(targets, initial, strict=True):
        info, s = layers[name], settings[name]
        node = _get(new_params, info.path)
        updated = dict(node)
        for k, v in weights.items():
            updated[k] = {**updated.get(k, {}), adapter_name: v}
        new_params = _set(new_params, info.path, _like(node, updated))
        layer = new_layers.get(name) or LinenDeltaLayer(
            name=name, path=info.path, kind=info.kind, stacked=info.stacked, in_shape=info.in_shape,
            out_shape=info.out_shape, perm=info.perm, out_perm=info.out_perm)
        new_layers[name] = dataclasses.replace(layer, adapters=layer.adapters + ((adapter_name, s),))
    active = spec.active if spec is not None else (adapter_name,)
    return new_params, LinenDeltaSpec(peft_type=method, layers=tuple(new_layers.values()), active=active,
                                      scan_axes=tuple(sorted(scan_axes.items())))


def _check_vera_peers(config: VeraConfig, spec: LinenDeltaSpec) -> None:
    for layer in spec.layers:
        for other, s in layer.adapters:
            if s.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    "Vera PRNG initialisation key must be the same for all adapters. Got "
                    f"config.projection_prng_key={config.projection_prng_key} but adapter {other!r} has "
                    f"{s.projection_prng_key}.")
            if s.save_projection != config.save_projection:
                raise ValueError(
                    "VeRA projection weights must be saved for all adapters or none, but got multiple different "
                    f"values: adapter {other!r} has save_projection={s.save_projection}, the new one "
                    f"{config.save_projection}")


@functools.partial(jax.jit, static_argnums=0)  # one compile for all the layers
def _init_all(plan: tuple, key) -> list[dict]:
    """For each ``(settings, n_in, n_out, stacked)`` in ``plan``, PEFT's initial weights with the
    ``stacked`` leading axes of the kernel (one draw per copy), layer ``i`` from ``fold_in(key, i)``."""
    out = []
    for i, (s, n_in, n_out, stacked) in enumerate(plan):
        k, n = jax.random.fold_in(key, i), math.prod(stacked)
        w = jax.vmap(lambda k, s=s, n_in=n_in, n_out=n_out: s.init(k, n_in, n_out))(
            jax.random.split(k, n) if n > 1 else k[None])
        out.append({name: v.reshape(stacked + v.shape[1:]) for name, v in w.items()})
    return out


def _zeros(plan: tuple) -> list[dict]:
    shapes = jax.eval_shape(functools.partial(_init_all.__wrapped__, plan), jax.random.key(0))
    return [{k: jnp.zeros(v.shape, v.dtype) for k, v in w.items()} for w in shapes]


# --------------------------------------------------------------------------------------------
# Forward

_busy = threading.local()


@contextlib.contextmanager
def intercept(spec: LinenDeltaSpec):
    """``peftjax.linen.intercept`` for a weight-delta spec: ``base(x) + dropout(x) @ ΔW`` per active adapter.

    Training (inside ``peftjax.dropout_key(key)``), as PEFT's layers in ``train()``: VeRA's
    ``vera_dropout`` / AdaLoRA's ``lora_dropout`` drop the branch input; LoHa/LoKr's
    ``rank_dropout`` keeps each output row of ``ΔW`` with probability ``1 - p`` (divided by the
    fraction kept when PEFT divides) and ``module_dropout`` skips the adapter for the call. The
    layer's name and the adapter's fold into the key. Outside a ``dropout_key`` block none applies.
    """
    layers = {layer.name: layer for layer in spec.layers}

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = ".".join(str(p) for p in ctx.module.path)
        layer = layers.get(name)
        busy = _busy.__dict__.setdefault("modules", set())
        if layer is None or id(ctx.module) in busy:  # a subclass calling super().__call__ adds once
            return next_fun(*args, **kwargs)
        live = [(n, s) for n, s in layer.adapters if n in spec.active]
        busy.add(id(ctx.module))
        try:
            if live and live[0][1].scales:
                return _rescaled(layer, live, ctx.module, next_fun, args, kwargs)
            y = next_fun(*args, **kwargs)
        finally:
            busy.discard(id(ctx.module))
        return _add_deltas(layer, live, ctx.module, args, kwargs, y) if live else y

    with nn.intercept_methods(interceptor):
        yield


def _add_deltas(layer: LinenDeltaLayer, live, module: nn.Module, args, kwargs, y):
    call = _call_info(layer, module, args, kwargs)
    n_in, n_out = layer.n_in_out
    train_key = active_dropout_key()
    out = y.astype(jnp.float32)
    for name, s in live:
        delta = s.delta(_weights(module, layer, s, name), n_in, n_out)  # [out, in]
        key = None
        if train_key is not None:
            key = fold_key(train_key, zlib.crc32(f"{layer.name}/{name}".encode()))
            if s.rank_dropout > 0:
                delta = delta * rank_dropout_mask(fold_key(key, 1), n_out, s)[:, None]
        h = apply_dropout(call.x, s.input_dropout, f"{layer.name}/{name}").astype(jnp.float32)
        branch = _linear(layer, module, call, h, _from_2d(layer, delta.T))
        if key is not None and s.module_dropout > 0:
            keep = keep_mask(fold_key(key, 0), (), 1.0 - s.module_dropout)
            branch = jnp.where(keep, branch, jnp.zeros_like(branch))
        out = out + branch
    return out.astype(y.dtype)


def _rescaled(layer: LinenDeltaLayer, live, module: nn.Module, next_fun, args, kwargs):
    """IA³ (PEFT's ``IA3Layer.forward``): the product of the active ``l`` scales the input
    (feedforward; cast back to its dtype before the base layer) or the base output."""
    call = _call_info(layer, module, args, kwargs)
    weights = [(s, _weights(module, layer, s, n)) for n, s in live]
    ins = [s.in_scale(w) for s, w in weights if s.in_scale(w) is not None]
    outs = [s.out_scale(w) for s, w in weights if s.out_scale(w) is not None]
    if ins:
        x = call.x
        scale = _on_input(layer, call, functools.reduce(jnp.multiply, ins), x.ndim)
        x = (x.astype(jnp.float32) * scale).astype(x.dtype)
        args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "inputs": x})
    y = next_fun(*args, **kwargs)
    if outs:
        scale = functools.reduce(jnp.multiply, outs).reshape((1,) * (y.ndim - len(layer.out_shape)) + layer.out_shape)
        y = (y.astype(jnp.float32) * scale).astype(y.dtype)
    return y


def _on_input(layer: LinenDeltaLayer, call, scale, ndim: int):
    """An ``[in]`` vector (kernel order of the contracted axes) shaped to broadcast against the input."""
    axes = call.axes if layer.kind == "dense_general" else (ndim - 1,)
    order = np.argsort(axes)
    v = jnp.transpose(scale.reshape(layer.in_shape), order)
    shape = [1] * ndim
    for a, size in zip(sorted(axes), v.shape, strict=True):
        shape[a] = size
    return v.reshape(shape)


def _weights(module: nn.Module, layer: LinenDeltaLayer, s, name: str) -> dict:
    out = {}
    for k in s.keys:
        store = module.get_variable("params", k)
        if store is not None and name in store:
            out[k] = flax_meta.unbox(store[name])
    if not out:
        raise ValueError(f"{layer.name}: params have none of {list(s.keys)} for adapter {name!r}; apply the model "
                         "with the params that inject returned (or combine(trainable, rest))")
    return out


# --------------------------------------------------------------------------------------------
# Merge


def merge_and_unload(params: Mapping, spec: LinenDeltaSpec, adapter_names: Sequence[str] | None = None) -> dict:
    """``peftjax.linen.merge_and_unload`` for a weight-delta spec: ``W += ΔW`` per adapter, adapters dropped."""
    names = spec.active if adapter_names is None else tuple(adapter_names)
    unknown = [n for n in names if n not in spec.adapter_names]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; known: {list(spec.adapter_names)}")
    out = params
    for layer in spec.layers:
        live = tuple((n, s) for n, s in layer.adapters if n in names)
        if not live:
            continue
        node = _get(out, layer.path)
        weights = {n: {k: node[k][n] for k in s.keys if k in node and n in node[k]} for n, s in live}
        kernel, bias = node["kernel"], node.get("bias")
        new_kernel, new_bias = _merge_layer(layer, live, flax_meta.unbox(kernel), flax_meta.unbox(bias), weights)
        updated = dict(node)
        updated["kernel"] = _rebox(kernel, new_kernel)
        if bias is not None:
            updated["bias"] = _rebox(bias, new_bias)
        out = _set(out, layer.path, _like(node, updated))
    return split(out).rest


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_layer(layer: LinenDeltaLayer, live, kernel, bias, weights):
    """The kernel plus each ``ΔWᵀ``; for IA³ its rows (feedforward) or columns and the bias scaled."""
    n_in, n_out = layer.n_in_out

    def one(w, b, ad):
        w2 = _to_2d(layer, w.astype(jnp.float32))
        b2 = None if b is None else b.astype(jnp.float32).reshape(-1)
        for name, s in live:
            if not s.scales:
                w2 = w2 + s.delta(ad[name], n_in, n_out).T
                continue
            if s.in_scale(ad[name]) is not None:
                w2 = w2 * s.in_scale(ad[name])[:, None]
            if s.out_scale(ad[name]) is not None:
                w2 = w2 * s.out_scale(ad[name])[None, :]
                b2 = None if b2 is None else b2 * s.out_scale(ad[name])
        return _from_2d(layer, w2).astype(w.dtype), (None if b is None else b2.reshape(b.shape).astype(b.dtype))

    return _over_stack(one, len(layer.stacked))(kernel, bias, weights)


# --------------------------------------------------------------------------------------------
# PEFT files


def save_adapter(directory: str | os.PathLike, params: Mapping, spec: LinenDeltaSpec, config, *,
                 adapter_name: str = "default", key_mapping: KeyMapping = None) -> Path:
    """``peftjax.linen.save_adapter`` for a weight-delta spec: PEFT's files (see there).

    Keys ``base_model.model.<torch name>.<attribute>`` hold the weights as they are (PEFT's
    layouts); VeRA with ``save_projection`` adds ``base_model.vera_A`` / ``base_model.vera_B``.
    The config is written with ``target_modules`` the full torch names of the adapted layers
    (LoHa/LoKr ``rank_pattern`` / ``alpha_pattern`` likewise), after checking that it gives
    every layer the settings it was injected with.

    Raises:
      ValueError: an unknown adapter, params without its weights, or a config that does not
        describe it (another method, other ranks...).
    """
    validate_adapter_name(adapter_name)
    if adapter_name not in spec.adapter_names:
        raise ValueError(f"unknown adapter {adapter_name!r}; known: {list(spec.adapter_names)}")
    mapping = LINEN_KEY_MAPPING if key_mapping is None else key_mapping
    file_config = _config_for_file(config, spec, params, adapter_name, mapping)
    tensors = {}
    for slot in _slots(params, spec, adapter_name, mapping):
        value = np.asarray(jax.device_get(flax_meta.unbox(_get(params, slot.path))))
        for k, one in zip(slot.keys, value.reshape((-1,) + value.shape[slot.n_stacked:]), strict=True):
            tensors[k] = np.ascontiguousarray(one, np.float32)
    settings = next(s for layer in spec.layers for n, s in layer.adapters if n == adapter_name)
    if isinstance(settings, VeraSettings) and settings.save_projection:
        a, b = settings.projections()
        tensors[VERA_A_KEY], tensors[VERA_B_KEY] = np.asarray(a, np.float32), np.asarray(b, np.float32)
    out = adapter_dir(directory, adapter_name)
    write_adapter(out, file_config, tensors)
    return out


def _torch_names(layer, spec: LinenDeltaSpec, params: Mapping, mapping) -> list[str]:
    scan = dict(spec.scan_axes)
    return _file_names(layer.path, _stacked_of(layer.path, scan, flax_meta.unbox(_get(params, layer.path)["kernel"])),
                       scan, mapping)


def _config_for_file(config, spec: LinenDeltaSpec, params: Mapping, adapter_name: str, mapping):
    if config.peft_type != spec.peft_type:
        raise ValueError(f"config is a {type(config).__name__}, but adapter {adapter_name!r} is {spec.peft_type}")
    layers = [(layer, layer.adapter[adapter_name]) for layer in spec.layers if adapter_name in layer.adapter]
    names = {layer.name: _torch_names(layer, spec, params, mapping) for layer, _ in layers}
    changes: dict[str, Any] = dict(target_modules=tuple(n for layer, _ in layers for n in names[layer.name]),
                                   exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    if spec.peft_type == "IA3":
        changes["feedforward_modules"] = tuple(n for layer, s in layers for n in names[layer.name] if s.is_feedforward)
    if spec.peft_type in ("LOHA", "LOKR"):
        changes["rank_pattern"] = {n: s.r for layer, s in layers for n in names[layer.name] if s.r != config.r}
        changes["alpha_pattern"] = {n: s.alpha for layer, s in layers for n in names[layer.name]
                                    if s.alpha != config.alpha}
    file_config = dataclasses.replace(config, **{k: v for k, v in changes.items() if hasattr(config, k)})
    shapes = [layer.n_in_out for layer, _ in layers]
    wrong = [n for layer, s in layers for n in names[layer.name]
             if settings_for(file_config, n, layer.n_in_out, shapes, n) != s]
    if wrong:
        raise ValueError(f"config does not describe adapter {adapter_name!r}: read back, it gives {wrong[:5]} other "
                         "settings than they were injected with; pass the config given to inject")
    return file_config


def _slots(params: Mapping, spec: LinenDeltaSpec, adapter_name: str, mapping) -> list[_Slot]:
    scan = dict(spec.scan_axes)
    same = lambda v: v  # noqa: E731  (the weights are kept in PEFT's layouts)
    slots = []
    for layer in spec.layers:
        if adapter_name not in layer.adapter:
            continue
        node = _get(params, layer.path)
        keys = [k for k in layer.adapter[adapter_name].keys if adapter_name in ((node or {}).get(k) or {})]
        if not keys:
            raise ValueError(f"{layer.name}: params/{'/'.join(layer.path)} holds no weights of adapter "
                             f"{adapter_name!r}; pass the params that inject returned (or combine(trainable, rest))")
        for k in keys:
            leaf = flax_meta.unbox(node[k][adapter_name])
            stacked = _stacked_of(layer.path, scan, leaf)
            names = _file_names(layer.path, stacked, scan, mapping)
            slots.append(_Slot(layer.path + (k, adapter_name), tuple(f"{PREFIX}{n}.{k}" for n in names),
                               len(stacked), same, same, True))
    return slots


def load_adapter(directory: str | os.PathLike, module: nn.Module | None, params: Mapping, *,
                 sample_args: Sequence[Any] = (), sample_kwargs: Mapping[str, Any] | None = None,
                 spec: LinenDeltaSpec | None = None, adapter_name: str = "default", key_mapping: KeyMapping = None,
                 config=None, key: jax.Array | None = None, allow_pickle: bool = False
                 ) -> tuple[dict, LinenDeltaSpec]:
    """``peftjax.linen.load_adapter`` for a LoHa/LoKr/VeRA/FourierFT/AdaLoRA file (see there).

    Raises:
      AdapterFileError: a tensor of the wrong shape or dtype (names the key); VeRA projections
        missing though ``save_projection`` is set, or different from the ones its
        ``projection_prng_key`` draws (which this path regenerates rather than stores).
      NotImplementedError: the file treats the stacked copies of a scanned layer differently.
    """
    directory = Path(directory)
    validate_adapter_name(adapter_name)
    config = load_config(directory) if config is None else config
    tensors = dict(read_adapter_weights(directory, allow_pickle=allow_pickle))
    mapping = LINEN_KEY_MAPPING if key_mapping is None else key_mapping
    if spec is None or adapter_name not in spec.adapter_names:
        if module is None:
            raise ValueError(f"adapter {adapter_name!r} is not in the spec yet; pass the Linen module to inject it")
        layers, scan_axes = _trace(module, *sample_args, **(sample_kwargs or {}))
        config, targets = _targets_from_file(config, layers, scan_axes, params, mapping, directory)
        # zeros first (no init to compile), PEFT's init only when the file lacks some weight
        loaded, new_spec = _inject(params, config, layers, scan_axes, targets, key=None, adapter_name=adapter_name,
                                   spec=spec)
        if any(k not in tensors and k.removeprefix(PREFIX) not in tensors
               for slot in _slots(loaded, new_spec, adapter_name, mapping) for k in slot.keys):
            loaded, new_spec = _inject(params, config, layers, scan_axes, targets,
                                       key=jax.random.key(0) if key is None else key, adapter_name=adapter_name,
                                       spec=spec)
        params, spec = loaded, new_spec
    projections = {k: tensors.pop(k) for k in (VERA_A_KEY, VERA_B_KEY) if k in tensors}
    settings = next(s for layer in spec.layers for n, s in layer.adapters if n == adapter_name)
    if isinstance(settings, VeraSettings):
        _check_projections(settings, projections, directory)
    params, missing, unexpected = _fill(params, _slots(params, spec, adapter_name, mapping), tensors, str(directory))
    if missing:
        warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}", stacklevel=2)
    if unexpected:
        warnings.warn(f"{directory}: ignored {len(unexpected)} keys that match nothing in the model: "
                      f"{unexpected[:10]}", stacklevel=2)
    return params, spec


def _check_projections(s: VeraSettings, found: Mapping[str, np.ndarray], source: Path) -> None:
    if not s.save_projection:
        if found:
            warnings.warn(f"{source}: Specified to not load vera_A and vera_B from state dictionary however they "
                          "are present in state dictionary! They are ignored: the projections are regenerated from "
                          "projection_prng_key, as PEFT does.", stacklevel=3)
        return
    missing = [k for k in (VERA_A_KEY, VERA_B_KEY) if k not in found]
    if missing:
        raise AdapterFileError(f"{source}: Specified to load vera_A and vera_B from state dictionary however they "
                               f"were not present! (save_projection is true in the config, but {missing} are not in "
                               "the file)")
    for k, mine in zip((VERA_A_KEY, VERA_B_KEY), s.projections(), strict=True):
        theirs = np.asarray(found[k], np.float32)
        if theirs.shape != mine.shape:
            raise AdapterFileError(f"{source}: {k}: expected shape {list(mine.shape)} (r and the largest targeted "
                                   f"layer), found {list(theirs.shape)}")
        if not np.allclose(theirs, mine, rtol=1e-6, atol=1e-7):
            raise AdapterFileError(f"{source}: {k} differs from the projection projection_prng_key="
                                   f"{s.projection_prng_key} draws; peftjax.linen regenerates the projections from "
                                   "the seed and cannot hold others (the NNX path can)")


def _targets_from_file(config, layers, scan_axes, params, mapping, source):
    """The file's config (torch names) -> ``(config, {linen name: torch name its patterns match})``."""
    if not is_delta_config(config):
        raise TypeError(f"{source}: a {type(config).__name__} is not a LoHa/LoKr/VeRA/FourierFT/AdaLoRA config")
    if config.target_modules is None:
        raise ValueError(f"{source}: target_modules is null (PEFT's default for the architecture), which a Linen "
                         "model has none of; pass config= with target_modules")
    names: dict[str, list[str]] = {}
    for name, info in layers.items():
        node = _get(params, info.path)
        if info.kind not in _LINEAR_KINDS or not isinstance(node, Mapping) or "kernel" not in node:
            continue
        try:
            stacked = tuple(np.shape(flax_meta.unbox(node["kernel"])))[: sum(_index_slots(info.path,
                                                                                      scan_axes).values())]
            names[name] = _file_names(info.path, stacked, scan_axes, mapping)
        except (NotImplementedError, ValueError):
            continue
    torch = {n: name for name, ns in names.items() for n in ns}
    config = _expand_all_linear(config, {n: layers[name].kind for n, name in torch.items()})
    hit = set(match_modules(config, list(torch)))
    targets, uneven = {}, []
    for name, ns in names.items():
        got = [n in hit for n in ns]
        if all(got):
            targets[name] = ns[0]
        elif any(got):
            uneven.append(name)
    if uneven:
        raise NotImplementedError(f"{source}: the adapter targets only some stacked copies of {uneven[:5]}; a "
                                  "scanned Linen layer holds one adapter for all its copies")
    shapes = [(math.prod(layers[n].in_shape), math.prod(layers[n].out_shape)) for n in targets]
    for name in targets:
        info, ns = layers[name], names[name]
        shape = (math.prod(info.in_shape), math.prod(info.out_shape))
        if len({settings_for(config, n, shape, shapes, n) for n in ns}) > 1:
            raise NotImplementedError(f"{source}: the adapter gives the stacked copies of {name} different settings "
                                      "(per-layer patterns); a scanned Linen layer holds one adapter for all")
    return config, targets
