"""LoRA for a user's own Flax Linen model: pure functions on its ``params`` pytree.

    params = model.init(key, x)["params"]
    params, spec = inject(model, params, LoraConfig(r=8, target_modules=["query", "value"]),
                          sample_args=(x,), key=key)
    trainable, rest = split(params, spec)       # train ``trainable``; ``rest`` stays frozen
    def forward(trainable, rest, x):            # jit this: the interceptor acts while tracing
        with intercept(spec):
            return model.apply({"params": combine(trainable, rest)}, x)
    served = merge_and_unload(params, spec)     # W + s * dW folded in, adapters removed
    save_adapter("out", params, spec, config)   # HF PEFT files; load_adapter reads them back

A targeted layer's params dict gains siblings of its ``kernel``, one entry per adapter name:
``lora_A/<name>``, ``lora_B/<name>``, plus ``lora_magnitude_vector/<name>`` for DoRA and
``lora_B_bias/<name>`` with ``lora_bias``. Living in ``params`` at the layer's own path, they are
sliced per layer by ``nn.scan``/``nn.vmap`` with ``variable_axes={"params": 0}``, exactly like the
kernel (a closure over an external adapter dict could not be).

The forward is intercepted with ``nn.intercept_methods``: a targeted layer's ``__call__`` returns
``base(x) + s * (dropout(x) @ A) @ B``, never the merged weight; :func:`merge_and_unload` builds that, for
inference and export. Layouts are Flax's (PEFT stores the transposes), float32, with any stacked
scan axes leading:

    nn.Dense         A [in, r]                         B [r, out]
    nn.DenseGeneral  A [prod(contracted axes), r]      B [r, prod(features)]
    nn.Einsum        A [prod(contracted kernel axes), r]  B [r, prod(output kernel axes)]
    nn.Embed         A [num_embeddings, r]             B [r, features]
    nn.Conv          A [*kernel_size, in, r]           B [r, out]

Module names are ``".".join(module.path)`` (``encoder.layers_0.attn.query``); a layer inside an
``nn.scan`` body has one name for all its scanned copies (``encoder.layers.attn.query``). PEFT's
``layers_to_transform`` reads a numbered segment (``layers.0.``), which Linen's ``layers_0`` names
and scanned layers do not have; name the modules in ``target_modules`` instead.

PEFT's ``modules_to_save`` puts a trainable copy of a module's params under it at
``modules_to_save/<name>``; the interceptor runs the module on the active adapter's copy.
PEFT's ``bias="all"``/``"lora_only"`` keeps the base biases where they are and has :func:`split`
and :func:`trainable_labels` (given the spec) treat them as trainable.

:func:`save_adapter` / :func:`load_adapter` write and read HF PEFT's two files in torch layouts
and names: the dotted params path with each scanned layer's index put after the scan's own name
(``layers/q_proj`` stacked ``[L, ...]`` -> ``layers.0.q_proj`` ... ``layers.{L-1}.q_proj``), then
``key_mapping`` (default :data:`LINEN_KEY_MAPPING`: ``dense_0`` -> ``dense.0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from flax.core import FrozenDict
from flax.core import meta as flax_meta

from peftjax.config import (
    CONFIG_NAME,
    LoraConfig,
    add_task_modules_to_save,
    expand_all_linear,
    is_all_linear,
    is_module_to_save,
    match_modules,
)
from peftjax.io._adapter import (
    PREFIX,
    AdapterFileError,
    KeyMapping,
    adapter_dir,
    map_name,
    read_adapter_weights,
    write_adapter,
)
from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import validate_adapter_name
from peftjax.tuners.base._rows import adapter_index, per_row, pick_rows
from peftjax.tuners.linen._methods import DELTA_KEYS
from peftjax.tuners.lora._math import (
    _same,
    _t,
    EinsumFactor,
    factor_einsum,
    LoraSpec,
    canonical_init,
    check_init,
    check_init_rank,
    decomposes,
    dora_factor,
    dora_output,
    init_weights,
    kernel_from_torch,
    kernel_to_torch,
    merged_weight,
    peft_weight_shape,
    torch_layout,
)
from peftjax.tuners.lora._model import FAN_IN_FAN_OUT_LINEAR_WARNING

ADAPTER_KEYS = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector")
"""The params keys that hold adapter weights (``{adapter name: array}`` each)."""

SAVED_KEY = "modules_to_save"
"""The params key under a ``modules_to_save`` module that holds ``{adapter name: params copy}``."""

TRAINABLE_KEYS = tuple(dict.fromkeys(ADAPTER_KEYS + DELTA_KEYS + (SAVED_KEY,)))
"""Every key :func:`split` moves to the adapter side (LoRA's, and those of the weight-delta methods of
``peftjax.tuners.linen``); with ``bias="none"`` the rest is the frozen base."""

TRAINABLE = "trainable"
FROZEN = "frozen"

_KINDS = (
    (nn.Dense, "dense"),
    (nn.DenseGeneral, "dense_general"),
    (nn.Einsum, "einsum"),
    (nn.Embed, "embed"),
    (nn.Conv, "conv"),
)
SUPPORTED_LAYERS = ("nn.Dense", "nn.DenseGeneral", "nn.Einsum", "nn.Embed", "nn.Conv")
_LINEAR_KINDS = ("dense", "dense_general", "einsum")  # what "all-linear" expands to


# --------------------------------------------------------------------------------------------
# Discovery


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One module of a Linen model, as seen while tracing its ``init``.

    Attributes:
      name: the dotted module path, ``".".join(module.path)``; what ``target_modules`` matches.
      path: where the module's variables sit in ``params`` (its scope path).
      kind: ``"dense"``, ``"dense_general"``, ``"einsum"``, ``"embed"``, ``"conv"`` or
        ``"unsupported"``.
      cls: the module's class name.
      kernel_shape: the kernel as one call sees it (one scanned layer); ``None`` if unsupported.
      stacked: leading axes that ``nn.scan``/``nn.vmap`` add to the kernel in ``params``.
      in_shape: the kernel's contracted axes (the adapter's input), in kernel order.
      out_shape: the kernel's output axes, in kernel order.
      perm: kernel axes to ``in_shape + out_shape`` order (only an einsum can interleave them).
      out_perm: ``out_shape`` order to the order the output (and the bias) uses.
      details: how the layer contracts: DenseGeneral ``axis``/``features``, the einsum string,
        Conv ``strides``/``padding``/dilations.
      reason: why LoRA cannot adapt this module, or ``None`` when it can.
    """

    name: str
    path: tuple[str, ...]
    kind: str
    cls: str
    kernel_shape: tuple[int, ...] | None = None
    stacked: tuple[int, ...] = ()
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    perm: tuple[int, ...] = ()
    out_perm: tuple[int, ...] = ()
    details: tuple[tuple[str, Any], ...] = ()
    reason: str | None = None

    @property
    def kernel_name(self) -> str:
        return "embedding" if self.kind == "embed" else "kernel"


def discover_layers(module: nn.Module, *args, **kwargs) -> dict[str, LayerInfo]:
    """Every sub-module of ``module`` that runs in ``module.init(key, *args, **kwargs)``.

    Only shapes are traced (``jax.eval_shape``), so this costs no FLOPs or memory. A layer called
    several times (weight sharing, the traces of an ``nn.scan`` body) is listed once.

    Example:
      >>> class Mlp(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
      >>> layers = discover_layers(Mlp(), jnp.ones((2, 4)))
      >>> {n: (i.kind, i.kernel_shape) for n, i in layers.items()}
      {'hidden': ('dense', (4, 8)), 'out': ('dense', (8, 3))}

    Returns:
      ``{dotted name: LayerInfo}`` in call order (the root module is left out).
    """
    return _trace(module, *args, **kwargs)[0]


def _trace(module: nn.Module, *args, **kwargs) -> tuple[dict[str, LayerInfo], dict[tuple[str, ...], int]]:
    """:func:`discover_layers`, plus where ``nn.scan``/``nn.vmap`` stack params: ``{scope path: axes}``.

    A lifted module's body sees its params without the stacked axes; comparing the fewest dims a
    module ever sees with ``init``'s output gives the axes stacked at or above it, and the
    difference from its parent's the axes its own transform adds (``-1``: not leading).
    """
    seen: dict[str, dict] = {}
    views: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[int, ...]]] = {}

    def recorder(next_fun, call_args, call_kwargs, ctx):
        out = next_fun(*call_args, **call_kwargs)
        m = ctx.module
        name = ".".join(str(p) for p in m.path)
        if not name or ctx.method_name == "setup":
            return out
        if m.scope is not None:
            view = _first_leaf(m.variables.get("params"))
            scope = tuple(str(p) for p in m.scope.path)
            if view is not None and (scope not in views or len(view[1]) < len(views[scope][1])):
                views[scope] = view
        if ctx.method_name == "__call__":
            if seen.get(name, {}).get("method") != "__call__":
                seen[name] = _describe(m, call_args, call_kwargs)
        elif name not in seen:  # replaced if __call__ runs later
            seen[name] = _placeholder(m, ctx.method_name)
        return out

    with nn.intercept_methods(recorder):
        variables = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    params = flax_meta.unbox(variables.get("params", {}))
    layers = {name: _locate(name, record, params) for name, record in seen.items()}
    return layers, _scan_axes(views, params)


def _first_leaf(tree: Any) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    leaves = jax.tree_util.tree_flatten_with_path(flax_meta.unbox(tree) if tree is not None else {})[0]
    if not leaves:
        return None
    path, leaf = leaves[0]
    return tuple(str(getattr(k, "key", k)) for k in path), tuple(jnp.shape(leaf))


def _scan_axes(views: Mapping, params: Mapping) -> dict[tuple[str, ...], int]:
    inside: dict[tuple[str, ...], int] = {(): 0}
    for scope, (rel, shape) in views.items():
        leaf = _get(params, scope + rel)
        if leaf is None:  # its params live elsewhere (a shared scope): says nothing about stacking
            continue
        full = tuple(jnp.shape(leaf))
        n = len(full) - len(shape)
        inside[scope] = n if n >= 0 and full[n:] == shape else -1
    axes = {}
    for scope in sorted(inside, key=len)[1:]:
        parent = next(scope[:j] for j in range(len(scope) - 1, -1, -1) if scope[:j] in inside)
        if inside[scope] < 0 or inside[parent] < 0:
            axes[scope] = -1
        elif inside[scope] != inside[parent]:
            axes[scope] = inside[scope] - inside[parent]
    return axes


def _kind_of(module: nn.Module) -> str:
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return "unsupported"


def _placeholder(m: nn.Module, method: str) -> dict:
    kind = _kind_of(m)
    record = {"method": method, "path": tuple(str(p) for p in m.scope.path), "kind": kind, "cls": type(m).__name__}
    if kind == "unsupported":
        return record | {"reason": f"{type(m).__name__} is not a layer LoRA adapts"}
    return record | {"reason": f"only its `{method}` method runs, and LoRA adapts `__call__`"}


def _describe(m: nn.Module, args, kwargs) -> dict:
    kind = _kind_of(m)
    record = {"method": "__call__", "path": tuple(str(p) for p in m.scope.path), "kind": kind, "cls": type(m).__name__}
    if kind == "unsupported":
        return record | {"reason": f"{type(m).__name__} is not a layer LoRA adapts"}
    kernel_name = "embedding" if kind == "embed" else "kernel"
    kernel = m.get_variable("params", kernel_name)
    if kernel is None:
        return record | {"reason": f"it has no `{kernel_name}` parameter"}
    shape = tuple(int(d) for d in jnp.shape(flax_meta.unbox(kernel)))
    record["kernel_shape"] = shape
    reason = None
    perm = tuple(range(len(shape)))
    details: dict[str, Any] = {}
    if kind in ("dense", "embed"):
        in_shape, out_shape = shape[:1], shape[1:]
    elif kind == "dense_general":
        axis = _as_tuple(m.axis)
        details = {"axis": axis, "features": _as_tuple(m.features), "batch_dims": _as_tuple(m.batch_dims)}
        if details["batch_dims"]:
            reason = f"batch_dims={details['batch_dims']} gives the kernel batch axes one low-rank pair cannot factor"
        n_batch = len(details["batch_dims"])
        in_shape, out_shape = shape[n_batch : n_batch + len(axis)], shape[n_batch + len(axis) :]
    elif kind == "conv":
        details = {
            "kernel_size": _as_tuple(m.kernel_size),
            "strides": _as_tuple(m.strides),
            "padding": _freeze(m.padding),
            "input_dilation": _as_tuple(m.input_dilation),
            "kernel_dilation": _as_tuple(m.kernel_dilation),
            "feature_group_count": m.feature_group_count,
        }
        if m.feature_group_count != 1:
            reason = f"feature_group_count={m.feature_group_count} (grouped convolutions cannot be merged, as in PEFT)"
        elif m.mask is not None:
            reason = "it has a kernel `mask`"
        in_shape, out_shape = shape[:-1], shape[-1:]
    else:  # einsum
        eq = _einsum_str(m, args, kwargs)
        details = {"einsum_str": eq}
        try:
            parts = _einsum_parts(eq, args[0] if args else kwargs["inputs"], shape)
        except ValueError as e:
            parts, reason = None, str(e)
        if parts is not None:
            perm, in_shape, out_shape = parts.perm, parts.in_shape, parts.out_shape
            record["out_perm"] = parts.out_perm
        else:
            in_shape, out_shape = (), ()
    record.update(in_shape=in_shape, out_shape=out_shape, perm=perm, details=tuple(details.items()), reason=reason)
    record.setdefault("out_perm", tuple(range(len(out_shape))))
    return record


def _locate(name: str, record: dict, params: Mapping) -> LayerInfo:
    """Finds the kernel in the ``params`` that ``init`` returned, to see any stacked axes."""
    record = {k: v for k, v in record.items() if k != "method"}
    info = LayerInfo(name=name, **record)
    if info.kernel_shape is None or info.reason is not None:
        return info
    node = _get(params, info.path)
    full = tuple(jnp.shape(node[info.kernel_name])) if isinstance(node, Mapping) and info.kernel_name in node else None
    k = len(info.kernel_shape)
    if full is None:
        return dataclasses.replace(info, reason=f"its kernel is not at params/{'/'.join(info.path)}")
    if full[len(full) - k :] != info.kernel_shape:
        return dataclasses.replace(
            info, reason=f"its kernel is stacked on a non-leading axis ({full} in params, {info.kernel_shape} per call)"
        )
    return dataclasses.replace(info, stacked=full[: len(full) - k])


class _EinsumParts(NamedTuple):
    lhs: str
    rhs: str
    out: str
    factor: EinsumFactor  # A's and B's contractions
    produced: str  # kernel letters that reach the output, kernel order
    perm: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_perm: tuple[int, ...]


def _einsum_str(m: nn.Module, args, kwargs) -> str:
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return (eq if eq is not None else m.einsum_str).replace(" ", "")


def _einsum_parts(eq: str, x, kernel_shape: tuple[int, ...]) -> _EinsumParts:
    """The einsum with its ellipses resolved to letters, factored by ``_math.factor_einsum``."""
    ops, out, _ = opt_einsum.parser.parse_einsum_input((eq, x, jax.ShapeDtypeStruct(kernel_shape, jnp.float32)))
    lhs, rhs = ops.split(",")
    try:
        factor = factor_einsum(f"{lhs},{rhs}->{out}")
    except ValueError as e:
        raise ValueError(f"einsum {eq!r}: {e}") from None
    produced = "".join(rhs[i] for i in factor.produced)
    perm = factor.contracted + factor.produced
    in_shape = tuple(kernel_shape[i] for i in factor.contracted)
    out_shape = tuple(kernel_shape[i] for i in factor.produced)
    out_perm = tuple(produced.index(c) for c in out if c in produced)
    return _EinsumParts(lhs, rhs, out, factor, produced, perm, in_shape, out_shape, out_perm)


# --------------------------------------------------------------------------------------------
# Static spec


@dataclasses.dataclass(frozen=True)
class LinenLayerSpec:
    """The adapters on one Linen layer (static: shapes and settings, no arrays)."""

    name: str
    path: tuple[str, ...]
    kind: str
    stacked: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    perm: tuple[int, ...]
    out_perm: tuple[int, ...]
    adapters: tuple[tuple[str, LoraSpec], ...] = ()

    @property
    def kernel_name(self) -> str:
        return "embedding" if self.kind == "embed" else "kernel"

    @property
    def adapter(self) -> dict[str, LoraSpec]:
        return dict(self.adapters)


@dataclasses.dataclass(frozen=True)
class LinenSavedSpec:
    """A ``modules_to_save`` module: each listed adapter keeps a full copy of its params.

    Attributes:
      name: the dotted module name.
      path: where its params sit (the copies are at ``path + ("modules_to_save", adapter)``).
      adapters: the adapters with a copy.
      kinds: ``(path inside the module, kind)`` of its sub-modules (``()`` for itself), which
        picks the torch layout of each kernel in the PEFT file.
    """

    name: str
    path: tuple[str, ...]
    adapters: tuple[str, ...]
    kinds: tuple[tuple[tuple[str, ...], str], ...] = ()


class AdapterLayersSpec:
    """What a Linen spec with ``layers`` (each with ``name`` and ``adapters``) and ``active`` offers:
    the adapter names, one layer by name, and a copy with other active adapters."""

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for layer in self.layers for n, _ in layer.adapters))

    def layer(self, name: str):
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no adapted layer {name!r}; adapted: {[layer.name for layer in self.layers]}")

    def with_active(self, *names: str):
        """The same spec with ``names`` (possibly none) as the active adapters."""
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; known: {list(self.adapter_names)}")
        return dataclasses.replace(self, active=tuple(names))


@dataclasses.dataclass(frozen=True)
class LinenLoraSpec(AdapterLayersSpec):
    """Which Linen layers carry which adapters, with their settings: static config for
    :func:`intercept` and :func:`merge_and_unload`. Frozen and hashable, so it can be a ``jit`` static arg.

    Attributes:
      layers: one entry per adapted layer, in discovery order.
      active: the adapters the forward applies (the first one injected, until changed with
        :meth:`with_active`).
      saved: the ``modules_to_save`` modules.
      bias: PEFT's ``bias`` option (``"none"``, ``"all"``, ``"lora_only"``): which base biases
        :func:`split` and :func:`trainable_labels` put on the trainable side.
      scan_axes: ``(scope path, n)`` for each module whose ``nn.scan``/``nn.vmap`` stacks ``n``
        leading axes onto the params under it (``-1``: a non-leading axis); it places the layer
        indices in PEFT file keys.
    """

    layers: tuple[LinenLayerSpec, ...]
    active: tuple[str, ...]
    saved: tuple[LinenSavedSpec, ...] = ()
    bias: str = "none"
    scan_axes: tuple[tuple[tuple[str, ...], int], ...] = ()



# --------------------------------------------------------------------------------------------
# Injection


def inject(
    module: nn.Module,
    params: Mapping,
    config: LoraConfig,
    *,
    sample_args: Sequence[Any] = (),
    sample_kwargs: Mapping[str, Any] | None = None,
    key: jax.Array,
    adapter_name: str = "default",
    spec: LinenLoraSpec | None = None,
) -> tuple[dict, LinenLoraSpec]:
    """Adds adapter ``adapter_name`` to every layer ``config`` targets; returns new params.

    Pure: ``params`` is not modified; the result shares every untouched leaf with it.

    Args:
      module: the Linen model (unbound).
      params: its ``params`` collection (``variables["params"]``).
      config: the LoRA settings; ``target_modules`` names the dotted module paths (a list entry
        also matches a suffix after a dot, as in PEFT). ``"all-linear"`` means every Dense,
        DenseGeneral and Einsum layer except one named ``lm_head``. ``modules_to_save`` (plus
        the head PEFT adds for ``task_type="SEQ_CLS"`` etc.) gives each matched module (any
        module with params, equal to an entry or ending in ``"." + entry``) a trainable copy of
        its params at ``<module>/modules_to_save/<adapter_name>``, which :func:`intercept` runs
        instead of the originals. ``bias`` only decides which base biases :func:`split` and
        :func:`trainable_labels` treat as trainable (``"all"``: every ``bias`` leaf;
        ``"lora_only"``: those of the targeted layers) and :func:`save_adapter` writes.
      sample_args: positional inputs for one ``module.init`` trace (only shapes matter).
      sample_kwargs: keyword inputs for that trace.
      key: the initialisation key; layer ``i`` of the targets uses ``fold_in(key, i)``.
      adapter_name: the name the weights are stored under (``lora_A/<name>``).
      spec: the spec of adapters injected before, to add a second adapter; the active adapters
        stay as they were (as PEFT's ``add_adapter``).

    Returns:
      ``(params, spec)``: the params with the adapters added, and the static spec.

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest module names are listed), the
        adapter already exists, ``params`` does not fit the model, or a second adapter asks for
        ``bias`` other than ``"none"`` (PEFT's rule).
      TypeError: a matched module is a layer LoRA cannot adapt (names the path and class).
      NotImplementedError: DoRA, ``lora_bias`` or PiSSA/OLoRA on a layer kind that lacks them.

    Example:
      >>> class Mlp(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
      >>> model, x = Mlp(), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> config = LoraConfig(r=2, target_modules=["hidden"])
      >>> params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
      >>> jax.tree.map(jnp.shape, split(params).trainable)
      {'hidden': {'lora_A': {'default': (4, 2)}, 'lora_B': {'default': (2, 8)}}}
      >>> with intercept(spec):
      ...     y = model.apply({"params": params}, x)
      >>> y.shape
      (2, 3)
    """
    validate_adapter_name(adapter_name)
    config = add_task_modules_to_save(config)
    layers, scan_axes = _trace(module, *sample_args, **(sample_kwargs or {}))
    if is_all_linear(config.target_modules):
        linear = [n for n, i in layers.items() if i.kind in _LINEAR_KINDS]
        output = "lm_head" if "lm_head" in layers else None
        config = dataclasses.replace(config, target_modules=tuple(expand_all_linear(linear, output, config.task_type)))
    targets = {name: config.scaling_for(name) for name in match_modules(config, list(layers))}
    saved = [n for n in layers if is_module_to_save(n, config.modules_to_save)]
    return _inject(params, config, layers, scan_axes, targets, saved, key=key, adapter_name=adapter_name, spec=spec)


def _inject(
    params: Mapping,
    config: LoraConfig,
    layers: Mapping[str, LayerInfo],
    scan_axes: Mapping[tuple[str, ...], int],
    targets: Mapping[str, tuple[int, int | float, float]],
    saved: Sequence[str],
    *,
    key: jax.Array,
    adapter_name: str,
    spec: LinenLoraSpec | None,
) -> tuple[dict, LinenLoraSpec]:
    """:func:`inject` once the targets (with their ``(r, alpha, scaling)``) and the
    ``modules_to_save`` names are resolved; every check runs before the first change."""
    bad = [layers[n] for n in targets if layers[n].reason is not None]
    if bad:
        listed = "; ".join(f"{i.name} ({i.cls}): {i.reason}" for i in bad[:10])
        raise TypeError(f"LoRA cannot adapt {listed}. Supported layers: {', '.join(SUPPORTED_LAYERS)}")

    previous = {layer.name: layer for layer in spec.layers} if spec is not None else {}
    if spec is not None and adapter_name in spec.adapter_names:
        raise ValueError(f"adapter {adapter_name!r} already exists; existing: {list(spec.adapter_names)}")
    if spec is not None and config.bias != "none":
        raise ValueError(
            f"bias={config.bias!r} on a second adapter: the base biases are shared, so (as in PEFT) only "
            "one adapter may train them; use bias='none' for every adapter but the first"
        )
    _check_saved(saved, layers, params, adapter_name)
    if config.fan_in_fan_out and any(layers[n].kind in _LINEAR_KINDS for n in targets):
        # PEFT's warning; Linen layers have torch.nn.Linear twins, so save_adapter writes False
        warnings.warn(FAN_IN_FAN_OUT_LINEAR_WARNING, stacklevel=3)
    init = canonical_init(config.init_lora_weights)  # PEFT ignores the case of "gaussian" and "olora"
    new_params = params
    new_layers = dict(previous)
    for i, name in enumerate(targets):
        info = layers[name]
        lora = LoraSpec.for_target(config, name)
        node = _get(params, info.path)
        _check_layer(info, lora, node, init, adapter_name)
        weights, kernel = _init_adapter(info, lora, node[info.kernel_name], jax.random.fold_in(key, i), init)
        updated = dict(node)
        updated[info.kernel_name] = kernel
        for k, v in weights.items():
            updated[k] = {**updated.get(k, {}), adapter_name: v}
        new_params = _set(new_params, info.path, _like(node, updated))
        layer = new_layers.get(name) or LinenLayerSpec(
            name=name,
            path=info.path,
            kind=info.kind,
            stacked=info.stacked,
            in_shape=info.in_shape,
            out_shape=info.out_shape,
            perm=info.perm,
            out_perm=info.out_perm,
        )
        new_layers[name] = dataclasses.replace(layer, adapters=layer.adapters + ((adapter_name, lora),))

    new_saved = {s.name: s for s in spec.saved} if spec is not None else {}
    for name in saved:
        info = layers[name]
        node = _get(new_params, info.path)
        # a real copy: a train step that donates the trainable buffers must not free the frozen original
        copy = jax.tree.map(lambda v: jnp.array(v, copy=True), dict(split(node).rest))  # no adapter leaves
        updated = dict(node)
        updated[SAVED_KEY] = {**updated.get(SAVED_KEY, {}), adapter_name: copy}
        new_params = _set(new_params, info.path, _like(node, updated))
        kinds = tuple(
            (i.path[len(info.path) :], i.kind) for i in layers.values() if i.path[: len(info.path)] == info.path
        )
        entry = new_saved.get(name) or LinenSavedSpec(name=name, path=info.path, adapters=(), kinds=kinds)
        new_saved[name] = dataclasses.replace(entry, adapters=entry.adapters + (adapter_name,))

    active = spec.active if spec is not None else (adapter_name,)
    return new_params, LinenLoraSpec(
        layers=tuple(new_layers.values()),
        active=active,
        saved=tuple(new_saved.values()),
        bias=spec.bias if spec is not None else config.bias,
        scan_axes=tuple(sorted(scan_axes.items())),
    )


def _check_saved(saved: Sequence[str], layers: Mapping[str, LayerInfo], params: Mapping, adapter_name: str) -> None:
    for name in saved:
        node = _get(params, layers[name].path)
        if not isinstance(node, Mapping) or not any(k != SAVED_KEY for k in node):
            raise ValueError(f"modules_to_save: {name} has no params to copy (params/{'/'.join(layers[name].path)})")
        if adapter_name in (node.get(SAVED_KEY) or {}):
            raise ValueError(f"adapter {adapter_name!r} already has a modules_to_save copy of {name}")
        inner = [o for o in saved if o != name and o.startswith(name + ".")]
        if inner:
            raise ValueError(f"modules_to_save matches both {name} and modules inside it ({', '.join(inner)})")


def _check_layer(info: LayerInfo, lora: LoraSpec, node: Any, init, adapter_name: str) -> None:
    where = f"params/{'/'.join(info.path)}"
    if not isinstance(node, Mapping) or info.kernel_name not in node:
        raise ValueError(
            f"{info.name}: {where}/{info.kernel_name} is missing; pass the `params` collection "
            "(variables['params']) of this model"
        )
    expected = info.stacked + info.kernel_shape
    found = tuple(jnp.shape(flax_meta.unbox(node[info.kernel_name])))
    if found != expected:
        raise ValueError(f"{where}/{info.kernel_name}: expected shape {list(expected)}, found {list(found)}")
    if adapter_name in (node.get("lora_A") or {}):
        raise ValueError(f"adapter {adapter_name!r} already exists on {info.name}")
    if info.kind == "embed" and (lora.use_dora or lora.lora_bias):
        raise NotImplementedError(f"{info.name}: DoRA and lora_bias on embeddings are not supported")
    # a DenseGeneral / Einsum kernel is a plain [n_in, n_out] matrix here, so PiSSA/OLoRA factor it
    check_init(info.kind if info.kind in ("embed", "conv") else "linear", init, info.name)
    if init in ("eva", "corda", "lora_ga"):  # calibrated on an NNX model's layer inputs or gradients
        raise NotImplementedError(f"{info.name}: init_lora_weights={init!r} is supported on NNX models (and the "
                                  "bundled ones), not through peftjax.linen")
    if lora.arrow is not None:  # its forward routes over the other adapters, which the interceptor does not do
        raise NotImplementedError(f"{info.name}: an Arrow router (LoraConfig.arrow_config) is supported on NNX "
                                  "models (peftjax.create_arrow_model), not through peftjax.linen")
    for what, option, used in (("KaSA", "kasa_config", lora.kasa), ("BD-LoRA", "use_bdlora", lora.block_diagonal),
                               ("VeLoRA", "velora_config", lora.velora),
                               ("aLoRA", "alora_invocation_tokens", lora.alora)):
        if used is not None:
            raise NotImplementedError(f"{info.name}: {what} (LoraConfig.{option}) is supported on NNX models (and the "
                                      "bundled ones), not through peftjax.linen")
    if init == "loftq":  # its quantizer runs on the host, outside this path's jitted init
        raise NotImplementedError(f"{info.name}: init_lora_weights='loftq' is supported on NNX models (and the "
                                  "bundled ones), not yet through peftjax.linen")
    check_init_rank(init, lora.r, info.name,
                    peft_weight_shape(info.kind, math.prod(info.in_shape), math.prod(info.out_shape)))
    if lora.lora_bias and "bias" not in node:
        raise ValueError(f"{info.name}: lora_bias=True needs a base bias to merge into, and {where} has none")


def _init_adapter(info: LayerInfo, lora: LoraSpec, kernel, key, init) -> tuple[dict, Any]:
    """Initial adapter weights (stacked like the kernel) and the kernel (rewritten by PiSSA/OLoRA)."""
    weights, new_w = _init_weights(info, lora, init, key, flax_meta.unbox(kernel))
    return weights, (_rebox(kernel, new_w) if decomposes(init) else kernel)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one compile per layer, not one per op
def _init_weights(info: LayerInfo, lora: LoraSpec, init, key, w):
    a_shape = info.kernel_shape[:-1] + (lora.r,) if info.kind == "conv" else (math.prod(info.in_shape), lora.r)
    kind = "embed" if info.kind == "embed" else "linear"

    def one(k, w_one):
        out, residual = init_weights(k, kind, init, _to_2d(info, w_one), lora)
        out["lora_A"] = out["lora_A"].reshape(a_shape)
        return out, (w_one if residual is None else _from_2d(info, residual).astype(w_one.dtype))

    if not info.stacked:
        weights, new_w = one(key, w)
    else:
        n = math.prod(info.stacked)
        weights, new_w = jax.vmap(one)(jax.random.split(key, n), w.reshape((n,) + info.kernel_shape))
        weights = jax.tree.map(lambda v: v.reshape(info.stacked + v.shape[1:]), weights)
        new_w = new_w.reshape(w.shape)
    return weights, new_w


# --------------------------------------------------------------------------------------------
# Forward


_busy = threading.local()


@contextlib.contextmanager
def intercept(spec: LinenLoraSpec, rows=None):
    """Adds the active adapters to targeted layers' ``__call__`` while the block runs.

    Use it inside the function you ``jit``: the interceptor acts while the model is traced, and a
    jitted function traced without it keeps running without adapters. Outside it (or with no
    active adapter) the model runs as if the adapter leaves were absent.

    Dropout (``lora_dropout``) is on only inside ``peftjax.dropout_key(key)``; each layer folds its
    name into the key. The layers of one ``nn.scan`` body share a name, so within one call they
    draw the same mask in every scanned step.

    Example:
      >>> class Mlp(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
      >>> model, x = Mlp(), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> config = LoraConfig(r=2, target_modules=["out"], init_lora_weights=False)
      >>> params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
      >>> def forward(params, x):
      ...     with intercept(spec):
      ...         return model.apply({"params": params}, x)
      >>> merged = model.apply({"params": merge_and_unload(params, spec)}, x)
      >>> bool(jnp.allclose(jax.jit(forward)(params, x), merged, atol=1e-5))
      True

    A ``modules_to_save`` module's ``__call__`` runs a parentless clone of the module on the
    active adapter's params copy, with its other collections (read-only) and fresh keys for its
    rng streams; its other methods (``Embed.attend``) keep the original params, as PEFT's
    wrapper forwards only ``forward``.

    A mixed batch (PEFT's ``adapter_names``) gives each row of the batch its own adapter, whichever
    are active: ``rows`` names one adapter per row (``"__base__"`` for none), or holds indices into
    ``spec.adapter_names`` (``len(spec.adapter_names)`` for none). Pass the indices as an argument
    of the jitted function (``peftjax.tuners.adapter_index(names, spec.adapter_names)``) and one
    compilation serves every assignment. Every targeted layer's input must have the batch as its
    leading axis. Each adapter's low-rank branch runs over the whole batch and each row keeps its
    own (no dropout: mixed batches are for inference, as in PEFT).

    Args:
      spec: from :func:`inject`.
      rows: ``None`` (every row uses the active adapters), or the adapter of each batch row.

    Raises:
      ValueError: two active adapters each have a ``modules_to_save`` copy of one module (PEFT
        refuses that too); ``rows`` names an unknown adapter or a DoRA adapter (PEFT's messages).
    """
    layers = {layer.name: layer for layer in spec.layers}
    if rows is not None:
        rows = _mixed_rows(spec, rows)
    active = spec.active
    copies = {}
    for saved in spec.saved:
        live = [n for n in active if n in saved.adapters]
        if len(live) > 1:
            raise ValueError(f"active adapters {live} each have a modules_to_save copy of {saved.name}; activate one")
        if live:
            copies[saved.name] = live[0]

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__" or _busy.__dict__.get("suspended", 0):
            return next_fun(*args, **kwargs)
        name = ".".join(str(p) for p in ctx.module.path)
        if rows is not None and name in saved_by_name:
            return _saved_rows(ctx.module, name, saved_by_name[name], rows, spec.adapter_names, next_fun, args, kwargs)
        if name in copies:
            return _run_saved_copy(ctx.module, name, copies[name], args, kwargs)
        layer = layers.get(name)
        busy = _busy.__dict__.setdefault("modules", set())
        if layer is None or id(ctx.module) in busy:  # a subclass calling super().__call__ adds once
            return next_fun(*args, **kwargs)
        busy.add(id(ctx.module))
        try:
            y = next_fun(*args, **kwargs)
        finally:
            busy.discard(id(ctx.module))
        if rows is not None:
            return _add_rows(layer, rows, spec.adapter_names, ctx.module, args, kwargs, y)
        live = [(n, s) for n, s in layer.adapters if n in active]
        return _add_adapters(layer, live, ctx.module, args, kwargs, y) if live else y

    saved_by_name = {saved.name: saved.adapters for saved in spec.saved}
    with nn.intercept_methods(interceptor):
        yield


def _mixed_rows(spec: LinenLoraSpec, rows) -> jax.Array:
    """``rows`` as ``[batch]`` int32 indices into ``spec.adapter_names``, checked."""
    names = spec.adapter_names
    if isinstance(rows, str):
        raise TypeError(f"rows: expected one adapter name (or index) per batch row, got {rows!r}")
    if isinstance(rows, list | tuple) and rows and isinstance(rows[0], str):
        rows = adapter_index(rows, names)
    rows = jnp.asarray(rows, jnp.int32)
    if rows.ndim != 1:
        raise ValueError(f"rows: expected one index per batch row ([batch]), found shape {list(rows.shape)}")
    if any(s.use_dora for layer in spec.layers for _, s in layer.adapters):
        raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
    return rows


def _check_rows(name: str, rows: jax.Array, x) -> None:
    if not jnp.ndim(x) or jnp.shape(x)[0] != rows.shape[0]:
        raise ValueError(
            f"{name}: a mixed batch needs the batch as the leading axis of every adapted layer's input; "
            f"rows has {rows.shape[0]} entries, the input has shape {tuple(jnp.shape(x))}"
        )


def _add_rows(layer: LinenLayerSpec, rows, names, module: nn.Module, args, kwargs, y):
    """Row ``i`` adds adapter ``names[rows[i]]``'s branch (nothing past the end)."""
    call = _call_info(layer, module, args, kwargs)
    _check_rows(layer.name, rows, call.x)
    index = {n: i for i, n in enumerate(names)}
    for name, s in layer.adapters:
        a, b = _adapter_weight(module, layer, "lora_A", name), _adapter_weight(module, layer, "lora_B", name)
        if layer.kind == "embed":
            lora = jnp.take(a, call.x, axis=0) @ b
        else:
            lora = _up(layer, call, _down(layer, module, call, call.x.astype(jnp.float32), a), b)
            if s.lora_bias:
                lora = lora + _per_output(layer, call, _adapter_weight(module, layer, "lora_B_bias", name), lora.ndim)
        mine = per_row(rows, rows == index[name], lora.ndim)
        y = y + jnp.where(mine, s.scaling * lora, 0.0).astype(y.dtype)
    return y


def _saved_rows(module: nn.Module, name: str, adapters, rows, names, next_fun, args, kwargs):
    """A ``modules_to_save`` module in a mixed batch: each row from its adapter's copy, else the original."""
    original = next_fun(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()), None)
    _check_rows(name, rows, x)
    outputs = [_run_saved_copy(module, name, n, args, kwargs) if n in adapters else original for n in names]
    return pick_rows(rows, outputs, original)


def _run_saved_copy(module: nn.Module, name: str, adapter: str, args, kwargs):
    store = module.get_variable("params", SAVED_KEY)
    if store is None or adapter not in store:
        raise ValueError(
            f"{name}: params have no {SAVED_KEY}/{adapter}; apply the model with the params that "
            "inject returned (or combine(trainable, rest))"
        )
    others = {c: v for c, v in module.variables.items() if c != "params"}
    rngs = {k: module.make_rng(k) for k in module.scope.rngs}
    # The clone's sub-modules have paths relative to it, which could collide with targeted
    # names; nothing inside a saved module is targeted, so interception pauses while it runs.
    _busy.suspended = _busy.__dict__.get("suspended", 0) + 1
    try:
        clone = module.clone(parent=None)
        return clone.apply({"params": store[adapter], **others}, *args, rngs=rngs or None, **kwargs)
    finally:
        _busy.suspended -= 1


class _Call(NamedTuple):
    """How one call contracts its input (the parts that depend on the input's rank)."""

    x: Any
    axes: tuple[int, ...] = ()  # DenseGeneral: the contracted input axes
    einsum: _EinsumParts | None = None


def _call_info(layer: LinenLayerSpec, module: nn.Module, args, kwargs) -> _Call:
    x = args[0] if args else kwargs["inputs"]
    if layer.kind == "dense_general":
        # sorted, as flax's DenseGeneral orders the kernel's contracted axes (_normalize_axes)
        return _Call(x, axes=tuple(sorted(a % x.ndim for a in _as_tuple(module.axis))))
    if layer.kind == "einsum":
        kernel_shape = tuple(_read(module, "kernel").shape)
        return _Call(x, einsum=_einsum_parts(_einsum_str(module, args, kwargs), x, kernel_shape))
    return _Call(x)


def _add_adapters(layer: LinenLayerSpec, live, module: nn.Module, args, kwargs, y):
    call = _call_info(layer, module, args, kwargs)
    x = call.x
    for name, s in live:
        a, b = _adapter_weight(module, layer, "lora_A", name), _adapter_weight(module, layer, "lora_B", name)
        if s.freeze_b:  # MiCA: B never trains (split keeps it with the frozen rest; this holds without spec too)
            b = jax.lax.stop_gradient(b)
        if layer.kind == "embed":  # PEFT applies no dropout to embeddings
            lora = jnp.take(a, x, axis=0) @ b
            y = y + (s.scaling * lora).astype(y.dtype)
            continue
        h = apply_dropout(x, s.dropout, f"{layer.name}/{name}")
        hf = h.astype(jnp.float32)
        lora = _up(layer, call, _down(layer, module, call, hf, a), b)
        if s.lora_bias:
            lora = lora + _per_output(layer, call, _adapter_weight(module, layer, "lora_B_bias", name), lora.ndim)
        if s.use_dora:
            y = y + _dora_extra(layer, module, call, name, s, h, hf, y, a, b, lora).astype(y.dtype)
        else:
            y = y + (s.scaling * lora).astype(y.dtype)
    return y


def _down(layer: LinenLayerSpec, module: nn.Module, call: _Call, h, a):
    """``h`` contracted with ``A``: the rank-r activations (rank axis last)."""
    r = a.shape[-1]
    if layer.kind == "dense":
        return h @ a
    if layer.kind == "dense_general":
        ak = a.reshape(layer.in_shape + (r,))
        return jax.lax.dot_general(h, ak, ((call.axes, tuple(range(len(call.axes)))), ((), ())))
    if layer.kind == "einsum":
        return jnp.einsum(call.einsum.factor.to_rank, h, a.reshape(layer.in_shape + (r,)))
    return _conv(module, h, a)  # conv: A is a kernel with r output channels, as PEFT's lora_A


def _up(layer: LinenLayerSpec, call: _Call, z, b):
    """The rank-r activations times ``B``, in the layer's output layout."""
    if layer.kind == "dense_general":
        return (z @ b).reshape(z.shape[:-1] + layer.out_shape)
    if layer.kind == "einsum":
        return jnp.einsum(call.einsum.factor.from_rank, z, b.reshape((b.shape[0],) + layer.out_shape))
    return z @ b  # dense, conv (B is PEFT's 1x1 lora_B)


def _linear(layer: LinenLayerSpec, module: nn.Module, call: _Call, h, w):
    """The layer's own contraction of ``h`` with kernel ``w``, without bias."""
    if layer.kind == "dense":
        return h @ w
    if layer.kind == "dense_general":
        n = len(call.axes)
        return jax.lax.dot_general(h, w, ((call.axes, tuple(range(n))), ((), ())))
    if layer.kind == "einsum":
        e = call.einsum
        return jnp.einsum(f"{e.lhs},{e.rhs}->{e.out}", h, w)
    return _conv(module, h, w)


def _conv(module: nn.Module, h, kernel):
    # A parentless clone reuses flax's own padding, dilation and batch-flattening logic; its
    # path is empty, so the interceptor passes it through.
    conv = module.clone(parent=None, features=kernel.shape[-1], use_bias=False, mask=None, dtype=None)
    return conv.apply({"params": {"kernel": kernel}}, h)


def _per_output(layer: LinenLayerSpec, call: _Call, v, ndim: int):
    """A per-output-unit vector (``out_shape`` flattened) shaped to broadcast against the output.

    Full rank, so that it also works under ``jax_numpy_rank_promotion="raise"``.
    """
    if layer.kind == "einsum":
        e = call.einsum
        v = jnp.transpose(v.reshape(layer.out_shape), layer.out_perm)
        return v.reshape(tuple(layer.out_shape[e.produced.index(c)] if c in e.produced else 1 for c in e.out))
    return v.reshape((1,) * (ndim - len(layer.out_shape)) + layer.out_shape)


def _bias_like_output(layer: LinenLayerSpec, call: _Call, bias, ndim: int):
    if layer.kind == "einsum":  # the bias holds the produced letters in output order
        e = call.einsum
        return bias.reshape(tuple(layer.out_shape[e.produced.index(c)] if c in e.produced else 1 for c in e.out))
    return bias.reshape((1,) * (ndim - bias.ndim) + bias.shape)


def _dora_extra(layer, module, call, name, s: LoraSpec, h, hf, y, a, b, lora):
    """PEFT's DoRA (``_math.dora_output``), its per-output factor laid out like the output."""
    w = _read(module, layer.kernel_name).astype(jnp.float32)
    magnitude = _adapter_weight(module, layer, "lora_magnitude_vector", name)
    factor = dora_factor(magnitude, _to_2d(layer, w), a, b, s.scaling)
    if s.dropout > 0 and h is not call.x:
        base = _linear(layer, module, call, hf, w)  # PEFT recomputes x @ W on the dropped-out input
    else:
        bias = _read(module, "bias")
        base = y.astype(jnp.float32)
        if bias is not None:
            base = base - _bias_like_output(layer, call, bias.astype(jnp.float32), base.ndim)
    return dora_output(_per_output(layer, call, factor, lora.ndim), base, lora, s.scaling)


def _read(module: nn.Module, name: str):
    value = module.get_variable("params", name)
    return None if value is None else flax_meta.unbox(value)


def _adapter_weight(module: nn.Module, layer: LinenLayerSpec, key: str, name: str):
    store = module.get_variable("params", key)
    if store is None or name not in store:
        raise ValueError(
            f"{layer.name}: params have no {key}/{name}; apply the model with the params that "
            "inject returned (or combine(trainable, rest))"
        )
    return flax_meta.unbox(store[name])


# --------------------------------------------------------------------------------------------
# Merge


def merge(*args, **kwargs):
    """Not a Linen function: see :func:`merge_and_unload` (raises ``TypeError``).

    ``peftjax.merge`` folds adapters into an NNX model in place and ``unmerge`` undoes it; the
    Linen path is pure, so its fold drops the adapters and is named as PEFT names that.
    """
    raise TypeError(
        "peftjax.linen.merge is now peftjax.linen.merge_and_unload(params, spec, adapter_names=None), as in PEFT: "
        "it returns new params with the adapters folded in and removed (peftjax.merge, which folds in place "
        "and can be undone, is for NNX models)"
    )


def merge_and_unload(params: Mapping, spec: LinenLoraSpec, adapter_names: Sequence[str] | None = None) -> dict:
    """Folds adapters into the base weights and drops every adapter leaf (for inference, export).

    ``W' = W + s * dW`` per adapter, in order; DoRA rescales each output unit to its magnitude,
    and ``lora_bias`` adds ``s * b`` to the base bias. Stacked scan axes are handled per layer.
    A ``modules_to_save`` module takes the chosen adapter's copy of its params. ``model.apply(
    {"params": merge_and_unload(params, spec)}, x)`` without :func:`intercept` then equals the intercepted
    forward with these adapters active.

    Args:
      params: params holding the adapters (from :func:`inject` or :func:`combine`).
      spec: from :func:`inject`.
      adapter_names: the adapters to fold in; the active ones by default.

    Returns:
      New base params (the input is not modified).

    Raises:
      ValueError: an unknown adapter name, or two chosen adapters with copies of one module.
    """
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
        weights = {n: {k: node[k][n] for k in ADAPTER_KEYS if k in node and n in node[k]} for n, _ in live}
        with_bias = any(s.lora_bias for _, s in live)
        kernel, bias = node[layer.kernel_name], node.get("bias") if with_bias else None
        new_kernel, new_bias = _merge_layer(layer, live, flax_meta.unbox(kernel), flax_meta.unbox(bias), weights)
        updated = dict(node)
        updated[layer.kernel_name] = _rebox(kernel, new_kernel)
        if with_bias:
            updated["bias"] = _rebox(bias, new_bias)
        out = _set(out, layer.path, _like(node, updated))
    for saved in spec.saved:
        chosen = [n for n in names if n in saved.adapters]
        if len(chosen) > 1:
            raise ValueError(f"adapters {chosen} each have a modules_to_save copy of {saved.name}; merge one")
        if chosen:  # the trained copy replaces the module's params, as PEFT's merge_and_unload does
            out = _set(out, saved.path, _like(_get(out, saved.path), dict(_get(out, saved.path)[SAVED_KEY][chosen[0]])))
    return split(out).rest


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_layer(layer: LinenLayerSpec, live, kernel, bias, weights):
    n = len(layer.stacked)
    new_kernel = _over_stack(lambda w, ad: _merged_kernel(layer, live, w, ad), n)(kernel, weights)
    new_bias = None if bias is None else _over_stack(lambda b, ad: _merged_bias(layer, live, b, ad), n)(bias, weights)
    return new_kernel, new_bias


def _merged_kernel(layer: LinenLayerSpec, live, w, weights):
    w2 = _to_2d(layer, w.astype(jnp.float32))
    for name, s in live:
        ad = weights[name]
        w2, _ = merged_weight(w2, ad["lora_A"], ad["lora_B"], s.scaling, ad.get("lora_magnitude_vector"))
    return _from_2d(layer, w2).astype(w.dtype)


def _merged_bias(layer: LinenLayerSpec, live, bias, weights):
    out = bias.astype(jnp.float32)
    for name, s in live:
        if s.lora_bias:
            v = jnp.transpose(weights[name]["lora_B_bias"].reshape(layer.out_shape), layer.out_perm)
            out = out + s.scaling * v.reshape(bias.shape)
    return out.astype(bias.dtype)


def _to_2d(layer, w):
    """A kernel as ``[prod(in_shape), prod(out_shape)]``."""
    return jnp.transpose(w, layer.perm).reshape(math.prod(layer.in_shape), math.prod(layer.out_shape))


def _from_2d(layer, w2):
    return jnp.transpose(w2.reshape(layer.in_shape + layer.out_shape), np.argsort(layer.perm))


def _over_stack(fn, n: int):
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


# --------------------------------------------------------------------------------------------
# Pytree utilities


class SplitParams(NamedTuple):
    """``params`` split in two, both with ``params``' nesting: what trains first, then the rest.

    The order of ``peftjax.split``'s ``(graphdef, trainable, rest)``, without the graphdef.
    """

    trainable: Any
    rest: Any


def split(params: Mapping, spec: LinenLoraSpec | None = None) -> SplitParams:
    """Splits params into ``(trainable, rest)``: what trains, and the frozen rest.

    The same order as ``peftjax.split``. ``trainable`` holds the ``lora_*`` and
    ``modules_to_save`` subtrees and, when ``spec`` has PEFT's ``bias="all"`` / ``"lora_only"``,
    those base ``bias`` leaves (moved, not copied: they are missing from ``rest``, and
    :func:`combine` puts them back). Without ``spec`` every bias stays in ``rest``. With ``spec``,
    a MiCA adapter's ``lora_B`` entries (``init_lora_weights="mica"``: frozen) stay in ``rest``
    too; without it they go to ``trainable``, where the forward gives them no gradient (but an
    optimizer's weight decay would still move them: pass ``spec``).

    Example:
      >>> trainable, rest = split({"q": {"kernel": 1, "lora_A": {"default": 2}}, "o": {"kernel": 3}})
      >>> trainable
      {'q': {'lora_A': {'default': 2}}}
      >>> rest
      {'q': {'kernel': 1}, 'o': {'kernel': 3}}
    """
    trains_bias = _bias_rule(spec)
    frozen = _frozen_factors(spec)

    def go(node, path):
        base, adapters = {}, {}
        for k, v in node.items():
            if k in TRAINABLE_KEYS and frozen.get((path, k)) and isinstance(v, Mapping):
                kept = frozen[(path, k)]  # MiCA's lora_B entries stay with the frozen rest
                trains = {n: w for n, w in v.items() if n not in kept}
                if trains:
                    adapters[k] = _like(v, trains)
                if len(trains) < len(v):
                    base[k] = _like(v, {n: w for n, w in v.items() if n in kept})
            elif k in TRAINABLE_KEYS:
                adapters[k] = v
            elif isinstance(v, Mapping):
                b, a = go(v, path + (k,))
                base[k] = b
                if a:
                    adapters[k] = _like(v, a)
            elif k == "bias" and trains_bias(path):
                adapters[k] = v
            else:
                base[k] = v
        return _like(node, base), adapters

    base, adapters = go(params, ())
    return SplitParams(_like(params, adapters), base)


def combine(trainable: Mapping, rest: Mapping) -> dict:
    """The inverse of :func:`split`: ``combine(*split(params, spec)) == params``.

    Raises:
      ValueError: both trees hold a leaf at the same path.
    """

    def go(b, a, path):
        out = dict(b)
        for k, v in a.items():
            if k not in out:
                out[k] = v
            elif isinstance(out[k], Mapping) and isinstance(v, Mapping) and k not in TRAINABLE_KEYS:
                out[k] = go(out[k], v, path + (k,))
            elif isinstance(out[k], Mapping) and isinstance(v, Mapping) and not set(out[k]) & set(v):
                out[k] = _like(out[k], {**out[k], **v})  # one adapter dict split by split (MiCA's lora_B)
            else:
                raise ValueError(f"both trees hold params/{'/'.join(path + (k,))}")
        return _like(b, out)

    return go(rest, trainable, ())


def trainable_labels(params: Mapping, spec: LinenLoraSpec | None = None) -> Any:
    """``"trainable"`` for what :func:`split` puts in ``trainable``, ``"frozen"`` for the rest.

    In ``params``' structure, for ``optax.multi_transform`` (alias ``optax.partition``): with
    ``set_to_zero`` on the frozen label the optimizer keeps no state for the base. Pass ``spec``
    so that PEFT's ``bias="all"`` / ``"lora_only"`` biases are labelled trainable.

    Example:
      >>> trainable_labels({"q": {"kernel": 1, "lora_A": {"default": 2}}})
      {'q': {'kernel': 'frozen', 'lora_A': {'default': 'trainable'}}}
    """
    trains_bias = _bias_rule(spec)
    frozen = _frozen_factors(spec)

    def go(node, label, path):
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                if k in TRAINABLE_KEYS and frozen.get((path, k)) and isinstance(v, Mapping):
                    out[k] = _like(v, {n: go(w, FROZEN if n in frozen[(path, k)] else TRAINABLE, path + (k, n))
                                       for n, w in v.items()})
                    continue
                trains = k in TRAINABLE_KEYS or (k == "bias" and not isinstance(v, Mapping) and trains_bias(path))
                out[k] = go(v, TRAINABLE if trains else label, path + (k,))
            return _like(node, out)
        return jax.tree.map(lambda _: label, node)

    return go(params, FROZEN, ())


def _frozen_factors(spec: LinenLoraSpec | None) -> dict[tuple[tuple[str, ...], str], frozenset[str]]:
    """``{(layer path, key): adapters}`` whose entry under that key never trains: MiCA's ``lora_B``."""
    if spec is None:
        return {}
    out = {}
    for layer in spec.layers:
        names = frozenset(n for n, s in layer.adapters if getattr(s, "freeze_b", False))  # other methods: none
        if names:
            out[(layer.path, "lora_B")] = names
    return out


def _bias_rule(spec: LinenLoraSpec | None):
    """``module path -> bool``: whether that module's base ``bias`` trains under ``spec.bias``."""
    if spec is None or spec.bias == "none":
        return lambda path: False
    saved = [entry.path for entry in spec.saved]  # their copies train instead

    def outside_saved(path):
        return not any(path[: len(p)] == p for p in saved)

    if spec.bias == "all":
        return outside_saved
    targeted = {layer.path for layer in spec.layers}
    return lambda path: path in targeted and outside_saved(path)


# --------------------------------------------------------------------------------------------
# PEFT files


LINEN_KEY_MAPPING: dict[str, str] = {r"_(\d+)(?=\.|$)": r".\1"}
r"""The default ``key_mapping``: Linen's auto-names (``layers_0``, ``Dense_1``) become torch's
numbered children (``layers.0``, ``Dense.1``); ``re.sub(r"_(\d+)(?=\.|$)", r".\1", name)``."""


class _Slot(NamedTuple):
    """One params leaf and the PEFT file keys of its stacked copies (C order)."""

    path: tuple[str, ...]  # in params
    keys: tuple[str, ...]  # full file keys, one per stacked copy
    n_stacked: int
    to_torch: Any  # one copy, Linen layout -> torch layout (NumPy)
    from_torch: Any
    required: bool  # reported missing when the file lacks it
    note: str = ""  # added to shape errors


def save_adapter(
    directory: str | os.PathLike,
    params: Mapping,
    spec: LinenLoraSpec,
    config: LoraConfig,
    *,
    adapter_name: str = "default",
    key_mapping: KeyMapping = None,
) -> Path:
    """Writes adapter ``adapter_name`` as HF PEFT files that ``PeftModel.from_pretrained`` loads.

    ``adapter_config.json`` (every LoraConfig field) and ``adapter_model.safetensors`` (float32
    adapter weights, ``{"format": "pt"}`` metadata) are written atomically; ``default`` goes into
    ``directory``, any other name into ``directory/<adapter_name>``, as PEFT lays them out.

    Keys are ``base_model.model.<torch module name>.<suffix>`` in torch layouts: Dense,
    DenseGeneral and Einsum (flattened) ``lora_A.weight [r, in]`` / ``lora_B.weight [out, r]``;
    Embed ``lora_embedding_A [r, num]`` / ``lora_embedding_B [dim, r]``; Conv ``lora_A.weight
    [r, in, *k]`` / ``lora_B.weight [out, r, 1, ...]``; ``lora_B.bias [out]`` (``lora_bias``);
    ``lora_magnitude_vector`` (DoRA; ``[1, out, 1, ...]`` for Conv). ``bias="lora_only"``
    adds ``<layer>.base_layer.bias``; ``"all"`` also ``<module>.bias`` for every other bias.
    A ``modules_to_save`` copy is written as the module's own torch params (``<module>.weight``
    from a ``kernel`` (transposed), ``embedding`` or ``scale``; ``<module>.bias``).

    The torch module name is ``key_mapping`` applied to the dotted params path, after a stacked
    layer's indices are put right after the name of the module that scans it: adapter
    ``[L, ...]`` at ``layers/q_proj`` (an ``nn.scan`` named ``layers``) gives the keys of
    ``layers.0.q_proj`` ... ``layers.{L-1}.q_proj``; nested scans give one index each. The
    default ``key_mapping`` is :data:`LINEN_KEY_MAPPING` (``dense_0`` -> ``dense.0``); pass a
    callable or ``{regex: replacement}`` (applied in order; ``{}`` for none) otherwise.

    The config is written with the torch names: ``target_modules`` lists every adapted module
    in full (as PEFT writes ``"all-linear"``), ``rank_pattern``/``alpha_pattern`` list the
    modules whose rank/alpha differ from ``r``/``lora_alpha``, and ``modules_to_save`` names
    the saved modules; ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` are
    cleared, since the list is already resolved. ``fan_in_fan_out`` is written ``false`` when a
    linear layer is adapted, as PEFT resets it on ``torch.nn.Linear`` (:func:`inject` warns).

    Args:
      directory: where to write (created if missing).
      params: params holding the adapter (from :func:`inject`, :func:`combine`).
      spec: from :func:`inject`.
      config: the config given to :func:`inject` for this adapter.
      adapter_name: the adapter to write.
      key_mapping: Linen params path (dotted, indices inserted) -> torch module name.

    Returns:
      The directory the files went to.

    Raises:
      ValueError: an unknown adapter, params that lack its weights, a ``config`` whose
        ``use_rslora``/``use_dora``/``lora_bias`` disagree with the spec, or a ``key_mapping``
        that sends two params to one key.
      NotImplementedError: a ``modules_to_save`` kernel with no torch layout (DenseGeneral,
        Einsum), or a module scanned on a non-leading axis.
    """
    validate_adapter_name(adapter_name)
    if adapter_name not in spec.adapter_names:
        raise ValueError(f"unknown adapter {adapter_name!r}; known: {list(spec.adapter_names)}")
    file_config = _config_for_file(config, spec, params, adapter_name, key_mapping)
    tensors = {}
    for slot in _file_slots(params, spec, adapter_name, key_mapping, bias=config.bias, loading=False):
        value = np.asarray(jax.device_get(flax_meta.unbox(_get(params, slot.path))))
        copies = value.reshape((-1,) + value.shape[slot.n_stacked :])
        for key, one in zip(slot.keys, copies, strict=True):
            tensors[key] = np.ascontiguousarray(slot.to_torch(one))
    out = adapter_dir(directory, adapter_name)
    write_adapter(out, file_config, tensors)
    return out


def load_adapter(
    directory: str | os.PathLike,
    module: nn.Module | None,
    params: Mapping,
    *,
    sample_args: Sequence[Any] = (),
    sample_kwargs: Mapping[str, Any] | None = None,
    spec: LinenLoraSpec | None = None,
    adapter_name: str = "default",
    key_mapping: KeyMapping = None,
    config: LoraConfig | None = None,
    key: jax.Array | None = None,
    allow_pickle: bool = False,
) -> tuple[dict, LinenLoraSpec]:
    """Reads HF PEFT files (PEFT's or :func:`save_adapter`'s) into Linen params; pure.

    When ``spec`` does not hold ``adapter_name`` yet, the adapter is first injected as the
    file's ``adapter_config.json`` says: its ``target_modules``, ``modules_to_save``,
    ``rank_pattern`` ... are matched against the torch names of ``module``'s layers (see
    :func:`save_adapter` for the naming); the weights then replace the init values. Keys the
    file lacks keep them (warned, as PEFT's "Found missing adapter keys"), and keys nothing
    uses are warned about. Saved base biases (``base_layer.bias``, ``bias``) and base weights
    (``base_layer.weight``) are loaded into the base params, whatever the ``bias`` option.

    Args:
      directory: the adapter directory itself (PEFT reads a non-``default`` adapter from its
        subfolder only when you name it, and so does this).
      module: the Linen model; only needed to inject (``None`` if ``spec`` has the adapter).
      params: the model's params (with or without adapters).
      sample_args: positional inputs for the tracing ``init`` (only shapes matter).
      sample_kwargs: keyword inputs for it.
      spec: the spec of adapters already injected (from :func:`inject` or a previous load); a
        new adapter joins it without becoming active, as PEFT's ``load_adapter``.
      adapter_name: the name to store the adapter under.
      key_mapping: as in :func:`save_adapter`.
      config: use this config instead of the file's.
      key: the init key for the injection (weights the file lacks keep these values).
      allow_pickle: accept ``adapter_model.bin`` (a pickle) when no safetensors file exists.

    Returns:
      ``(params, spec)``.

    Raises:
      FileNotFoundError: no ``adapter_config.json`` or weights file (names the path).
      AdapterFileError: (a ValueError) a tensor whose shape disagrees (names the key, the
        expected and the found shape) or that is not a float tensor.
      ValueError: the config targets none of the model's layers (the closest torch names are
        listed).
      NotImplementedError: the file treats the stacked copies of a scanned layer differently
        (``layers_to_transform``, per-layer ranks), which one Linen layer cannot hold.
    """
    directory = Path(directory)
    validate_adapter_name(adapter_name)
    if config is None:
        config = _read_config(directory, adapter_name)
    tensors = read_adapter_weights(directory, allow_pickle=allow_pickle)
    mapping = LINEN_KEY_MAPPING if key_mapping is None else key_mapping
    if spec is None or adapter_name not in spec.adapter_names:
        if module is None:
            raise ValueError(f"adapter {adapter_name!r} is not in the spec yet; pass the Linen module to inject it")
        layers, scan_axes = _trace(module, *sample_args, **(sample_kwargs or {}))
        linen_config, targets, saved = _targets_from_file(config, layers, scan_axes, params, mapping, directory)
        key = jax.random.key(0) if key is None else key
        params, spec = _inject(
            params, linen_config, layers, scan_axes, targets, saved, key=key, adapter_name=adapter_name, spec=spec
        )
    slots = _file_slots(params, spec, adapter_name, mapping, bias="all", loading=True)
    params, missing, unexpected = _fill(params, slots, tensors, str(directory))
    if missing:
        warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}", stacklevel=2)
    if unexpected:
        warnings.warn(
            f"{directory}: ignored {len(unexpected)} keys that match nothing in the model: {unexpected[:10]}",
            stacklevel=2,
        )
    return params, spec


def _read_config(directory: Path, adapter_name: str) -> LoraConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if (directory / adapter_name / CONFIG_NAME).is_file():
            hint = f"; adapter {adapter_name!r} is in {directory / adapter_name} (PEFT's folder for it)"
        raise FileNotFoundError(f"adapter config not found: {path}{hint}")
    return LoraConfig.from_pretrained(directory)


def _config_for_file(
    config: LoraConfig, spec: LinenLoraSpec, params: Mapping, adapter_name: str, key_mapping: KeyMapping
) -> LoraConfig:
    mapping = LINEN_KEY_MAPPING if key_mapping is None else key_mapping
    scan = dict(spec.scan_axes)
    layers = [(layer, layer.adapter[adapter_name]) for layer in spec.layers if adapter_name in layer.adapter]
    bad = []
    for layer, s in layers:
        expected = s.alpha / math.sqrt(s.r) if config.use_rslora else s.alpha / s.r
        same = math.isclose(s.scaling, expected, rel_tol=1e-6)
        if not same or s.use_dora != bool(config.use_dora) or s.lora_bias != bool(config.lora_bias):
            bad.append(layer.name)
    if bad:
        raise ValueError(
            f"config does not describe adapter {adapter_name!r}: its use_rslora/use_dora/lora_bias disagree "
            f"with how {bad[:5]} were injected; pass the config given to inject"
        )
    names = {layer.name: _file_names(layer.path, layer.stacked, scan, mapping) for layer, _ in layers}
    rank = {n: s.r for layer, s in layers for n in names[layer.name] if s.r != config.r}
    alpha = {n: s.alpha for layer, s in layers for n in names[layer.name] if s.alpha != config.lora_alpha}
    saved = []
    for entry in spec.saved:
        copy = _get(params, entry.path + (SAVED_KEY, adapter_name)) if adapter_name in entry.adapters else None
        first = _first_leaf(copy) if copy is not None else None
        if first is not None:
            stacked = first[1][: sum(_index_slots(entry.path, scan).values())]
            saved += _file_names(entry.path, stacked, scan, mapping)
    return dataclasses.replace(
        config,
        # PEFT resets it on torch.nn.Linear, the twin of every Linen linear kind (see _inject)
        fan_in_fan_out=config.fan_in_fan_out and not any(layer.kind in _LINEAR_KINDS for layer, _ in layers),
        target_modules=tuple(n for layer, _ in layers for n in names[layer.name]),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern=rank,
        alpha_pattern=alpha,
        modules_to_save=tuple(saved) or None,
    )


def _index_slots(path: tuple[str, ...], scan: Mapping[tuple[str, ...], int]) -> dict[int, int]:
    """``{j: n}``: ``n`` layer indices go after ``path[j - 1]``, the module whose scan adds them."""
    out = {}
    for j in range(1, len(path) + 1):
        n = scan.get(path[:j], 0)
        if n < 0:
            raise NotImplementedError(
                f"{'.'.join(path[:j])} stacks its params on a non-leading axis; PEFT file keys need the layer "
                "axis first (nn.scan/nn.vmap with variable_axes={'params': 0})"
            )
        if n:
            out[j] = n
    return out


def _stacked_of(path, scan, leaf) -> tuple[int, ...]:
    """The stacked sizes of ``leaf``, a param of the module at ``path``."""
    return tuple(np.shape(leaf)[: sum(_index_slots(path, scan).values())])


def _file_names(path: tuple[str, ...], stacked: tuple[int, ...], scan, mapping: KeyMapping) -> list[str]:
    """The torch module name of each stacked copy of the module at ``path`` (C order)."""
    slots = _index_slots(path, scan)
    if sum(slots.values()) != len(stacked):
        raise ValueError(
            f"params/{'/'.join(path)} has {len(stacked)} stacked axes, but the traced model stacks "
            f"{sum(slots.values())} there; use the spec that inject returned for this model"
        )
    names = []
    for index in itertools.product(*(range(n) for n in stacked)):
        it, parts = iter(index), []
        for j, segment in enumerate(path, 1):
            parts.append(segment)
            parts.extend(str(next(it)) for _ in range(slots.get(j, 0)))
        names.append(map_name(".".join(parts), mapping))
    return names


def _layer_layout(layer: LinenLayerSpec) -> dict[str, tuple[str, Any, Any]]:
    """``{params key: (file suffix, to_torch, from_torch)}`` of one layer's adapter weights."""
    return torch_layout(layer.kind, len(layer.in_shape) - 1 if layer.kind == "conv" else 0)


def _base_layout(layer: LinenLayerSpec, leaf: str) -> tuple[Any, Any] | None:
    """A targeted layer's own ``bias`` / kernel in the torch layout its adapter implies."""
    if leaf == "bias":  # flat, in B's output order (an einsum's bias is in output order)
        perm = layer.out_perm
        shown = tuple(layer.out_shape[p] for p in perm)
        return (
            lambda b: np.transpose(b.reshape(shown), np.argsort(perm)).reshape(-1),
            lambda t: np.transpose(t.reshape(layer.out_shape), perm),
        )
    return {"dense": (_t, _t), "embed": (_same, _same), "conv": (kernel_to_torch, kernel_from_torch)}.get(layer.kind)


def _saved_layout(saved: LinenSavedSpec, rel: tuple[str, ...], ndim: int) -> tuple[str, Any, Any]:
    """``(torch name, to_torch, from_torch)`` of one leaf of a ``modules_to_save`` copy."""
    leaf = rel[-1]
    if leaf == "kernel":
        kind = dict(saved.kinds).get(rel[:-1])
        if kind == "conv":
            return "weight", kernel_to_torch, kernel_from_torch
        if ndim == 2:
            return "weight", _t, _t
        where = ".".join((*saved.path, *rel))
        raise NotImplementedError(
            f"modules_to_save: {where} is a {ndim}-d {kind or 'unknown'} kernel with no torch layout"
        )
    if leaf in ("embedding", "scale"):
        return "weight", _same, _same
    return leaf, _same, _same


def _file_slots(
    params: Mapping, spec: LinenLoraSpec, adapter_name: str, key_mapping: KeyMapping, *, bias: str, loading: bool
) -> list[_Slot]:
    """Every params leaf that adapter ``adapter_name``'s PEFT file holds (or, loading, may hold)."""
    mapping = LINEN_KEY_MAPPING if key_mapping is None else key_mapping
    scan = dict(spec.scan_axes)
    slots: list[_Slot] = []

    def add(where, module_path, suffix, leaf, to_torch, from_torch, required, note=""):
        stacked = _stacked_of(module_path, scan, flax_meta.unbox(leaf))
        keys = tuple(f"{PREFIX}{n}.{suffix}" for n in _file_names(module_path, stacked, scan, mapping))
        slots.append(_Slot(where, keys, len(stacked), to_torch, from_torch, required, note))

    wrapped = {layer.path: layer for layer in spec.layers}  # PEFT wraps them whichever adapter they hold
    for layer in spec.layers:
        if adapter_name not in layer.adapter:
            continue
        node = _get(params, layer.path)
        if not isinstance(node, Mapping) or adapter_name not in (node.get("lora_A") or {}):
            raise ValueError(
                f"{layer.name}: params/{'/'.join(layer.path)} has no lora_A/{adapter_name}; pass the params "
                "that inject returned (or combine(trainable, rest))"
            )
        note = f" (r={layer.adapter[adapter_name].r})"
        for k, (suffix, to_torch, from_torch) in _layer_layout(layer).items():
            if adapter_name in (node.get(k) or {}):
                leaf = node[k][adapter_name]
                add(layer.path + (k, adapter_name), layer.path, suffix, leaf, to_torch, from_torch, True, note)
        if loading and layer.kernel_name in node and _base_layout(layer, "kernel"):
            add(layer.path + (layer.kernel_name,), layer.path, "base_layer.weight", node[layer.kernel_name],
                *_base_layout(layer, "kernel"), False)  # fmt: skip

    saved_paths = [entry.path for entry in spec.saved]
    if bias != "none" or loading:
        for path in _bias_owners(params):
            if any(path[: len(p)] == p for p in saved_paths):  # its copy's bias is saved instead
                continue
            leaf = _get(params, path + ("bias",))
            if path in wrapped:
                add(path + ("bias",), path, "base_layer.bias", leaf, *_base_layout(wrapped[path], "bias"), False)
            elif bias == "all":
                add(path + ("bias",), path, "bias", leaf, _same, _same, False)

    for entry in spec.saved:
        if adapter_name not in entry.adapters:
            continue
        where = entry.path + (SAVED_KEY, adapter_name)
        copy = _get(params, where)
        if not isinstance(copy, Mapping):
            raise ValueError(
                f"modules_to_save: params/{'/'.join(where)} is missing; pass the params that inject returned"
            )
        for rel, leaf in _leaves(copy):
            module_path = entry.path + rel[:-1]
            n = len(_stacked_of(module_path, scan, flax_meta.unbox(leaf)))
            name, to_torch, from_torch = _saved_layout(entry, rel, np.ndim(flax_meta.unbox(leaf)) - n)
            add(where + rel, module_path, name, leaf, to_torch, from_torch, True)

    seen: dict[str, tuple[str, ...]] = {}
    clashes = []
    for slot in slots:
        for k in slot.keys:
            if k in seen and seen[k] != slot.path:
                clashes.append(f"{k} <- params/{'/'.join(seen[k])} and params/{'/'.join(slot.path)}")
            seen[k] = slot.path
    if clashes:
        raise ValueError(f"key_mapping gives several params one PEFT key: {clashes[:5]}")
    return slots


def _bias_owners(params: Mapping) -> list[tuple[str, ...]]:
    """The module paths holding a base ``bias`` leaf (outside adapter subtrees)."""
    out = []

    def go(node, path):
        for k, v in node.items():
            if k in TRAINABLE_KEYS:
                continue
            if isinstance(v, Mapping):
                go(v, path + (k,))
            elif k == "bias":
                out.append(path)

    go(params, ())
    return out


def _leaves(tree: Mapping, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out += _leaves(v, path + (k,))
        else:
            out.append((path + (k,), v))
    return out


def _fill(params: Mapping, slots: list[_Slot], tensors: Mapping[str, np.ndarray], source: str):
    """Sets each slot's leaf from the file; returns ``(params, missing keys, unexpected keys)``."""
    # keys without the prefix are accepted too, as PEFT accepts them from inject_adapter_in_model
    by_key = {k if k.startswith(PREFIX) else PREFIX + k: v for k, v in tensors.items()}
    used, missing = set(), []
    out = params
    for slot in slots:
        boxed = _get(out, slot.path)
        current = flax_meta.unbox(boxed)
        shape = tuple(np.shape(current))
        one = shape[slot.n_stacked :]
        expected = tuple(slot.to_torch(np.broadcast_to(np.zeros((), np.float32), one)).shape)
        present = [k for k in slot.keys if k in by_key]
        if slot.required:
            missing += [k for k in slot.keys if k not in by_key]
        if not present:
            continue
        copies = np.array(jax.device_get(current)).reshape((-1,) + one)
        for i, k in enumerate(slot.keys):
            if k not in by_key:
                continue
            value = by_key[k]
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise AdapterFileError(f"{source}: {k}: expected a float tensor, found dtype {value.dtype}")
            if tuple(value.shape) != expected:
                raise AdapterFileError(
                    f"{source}: {k}: expected shape {list(expected)}{slot.note}, found {list(value.shape)}"
                )
            copies[i] = np.asarray(slot.from_torch(np.asarray(value))).reshape(one)
            used.add(k)
        new = jnp.asarray(copies.reshape(shape), current.dtype)
        if isinstance(current, jax.Array):
            new = jax.device_put(new, current.sharding)
        out = _set(out, slot.path, _rebox(boxed, new))
    return out, missing, sorted(k for k in by_key if k not in used)


def _targets_from_file(config: LoraConfig, layers, scan_axes, params, mapping, source):
    """A file's config (torch names) -> ``(config, {linen target: (r, alpha, scaling)}, saved)``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{source}: a {type(config).__name__} is not a LoRA adapter config")
    config = add_task_modules_to_save(config)
    names: dict[str, list[str]] = {}  # linen module name -> the torch name of each stacked copy
    for name, info in layers.items():
        node = _get(params, info.path)
        first = _first_leaf(split(node).rest) if isinstance(node, Mapping) else None
        if first is None:
            continue
        try:
            stacked = first[1][: sum(_index_slots(info.path, scan_axes).values())]
            names[name] = _file_names(info.path, stacked, scan_axes, mapping)
        except NotImplementedError:
            continue
    torch_names = {n: name for name, ns in names.items() for n in ns}
    if config.target_modules is None:
        raise ValueError(
            f"{source}: target_modules is null (PEFT's default for the architecture), which a Linen model "
            "has none of; pass config= with target_modules"
        )
    if is_all_linear(config.target_modules):
        linear = [n for n, name in torch_names.items() if layers[name].kind in _LINEAR_KINDS]
        output = "lm_head" if "lm_head" in torch_names else None
        config = dataclasses.replace(config, target_modules=tuple(expand_all_linear(linear, output, config.task_type)))
    hit = set(match_modules(config, list(torch_names)))
    wanted = config.modules_to_save or ()
    targets, saved, uneven = {}, [], []
    for name, ns in names.items():
        got = [n in hit for n in ns]
        scalings = {config.scaling_for(n) for n in ns}
        if all(got) and len(scalings) == 1:
            targets[name] = scalings.pop()
        elif any(got):
            uneven.append(name)
        keep = [is_module_to_save(n, wanted) for n in ns]
        if all(keep):
            saved.append(name)
        elif any(keep):
            uneven.append(name)
    if uneven:
        raise NotImplementedError(
            f"{source}: the adapter treats the stacked copies of {uneven[:5]} differently (layers_to_transform, "
            "per-layer rank_pattern/alpha_pattern or modules_to_save); a scanned Linen layer holds one adapter "
            "of one shape for all its copies"
        )
    if decomposes(config.init_lora_weights):
        config = dataclasses.replace(config, init_lora_weights=True)  # the file holds the result; keep the base
    return config, targets, saved


# --------------------------------------------------------------------------------------------
# Helpers


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _set(tree: Mapping, path: tuple[str, ...], value: Any) -> Mapping:
    """A copy of ``tree`` with ``value`` at ``path``, copying only the dicts on the way."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    out = dict(tree)
    out[head] = _set(tree[head], rest, value)
    return _like(tree, out)


def _like(original: Any, d: dict) -> Any:
    return FrozenDict(d) if isinstance(original, FrozenDict) else d


def _rebox(original: Any, value: Any) -> Any:
    if isinstance(original, flax_meta.AxisMetadata):
        return original.replace_boxed(value)
    return value


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value
