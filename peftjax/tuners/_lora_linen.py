"""LoRA for a user's own Flax Linen model: pure functions on its ``params`` pytree.

    params = model.init(key, x)["params"]
    params, spec = inject(model, params, LoraConfig(r=8, target_modules=["query", "value"]),
                          sample_args=(x,), key=key)
    base, adapters = split(params)              # train ``adapters``; ``base`` stays frozen
    def forward(adapters, base, x):             # jit this: the interceptor acts while tracing
        with intercept(spec):
            return model.apply({"params": combine(base, adapters)}, x)
    served = merge(params, spec)                # W + s * dW folded in, adapters removed

A targeted layer's params dict gains siblings of its ``kernel``, one entry per adapter name:
``lora_A/<name>``, ``lora_B/<name>``, plus ``lora_magnitude_vector/<name>`` for DoRA and
``lora_B_bias/<name>`` with ``lora_bias``. Living in ``params`` at the layer's own path, they are
sliced per layer by ``nn.scan``/``nn.vmap`` with ``variable_axes={"params": 0}``, exactly like the
kernel (a closure over an external adapter dict could not be).

The forward is intercepted with ``nn.intercept_methods``: a targeted layer's ``__call__`` returns
``base(x) + s * (dropout(x) @ A) @ B``, never the merged weight; :func:`merge` builds that, for
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import string
import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import opt_einsum
from flax.core import FrozenDict
from flax.core import meta as flax_meta

from peftjax.config import LoraConfig, expand_all_linear, is_all_linear, match_modules
from peftjax.tuners._dropout import apply_dropout
from peftjax.tuners._lora import validate_adapter_name
from peftjax.tuners._lora_nnx import LoraSpec, _decompose, init_factors

ADAPTER_KEYS = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector")
"""The params keys that hold adapter weights; everything else is the frozen base."""

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
    seen: dict[str, dict] = {}

    def recorder(next_fun, call_args, call_kwargs, ctx):
        out = next_fun(*call_args, **call_kwargs)
        m = ctx.module
        name = ".".join(str(p) for p in m.path)
        if not name or ctx.method_name == "setup":
            return out
        if ctx.method_name == "__call__":
            if seen.get(name, {}).get("method") != "__call__":
                seen[name] = _describe(m, call_args, call_kwargs)
        elif name not in seen:  # replaced if __call__ runs later
            seen[name] = _placeholder(m, ctx.method_name)
        return out

    with nn.intercept_methods(recorder):
        variables = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    params = flax_meta.unbox(variables.get("params", {}))
    return {name: _locate(name, record, params) for name, record in seen.items()}


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
    contracted: str  # kernel letters summed with the input, kernel order
    produced: str  # kernel letters that reach the output, kernel order
    perm: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    out_perm: tuple[int, ...]


def _einsum_str(m: nn.Module, args, kwargs) -> str:
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
    return (eq if eq is not None else m.einsum_str).replace(" ", "")


def _einsum_parts(eq: str, x, kernel_shape: tuple[int, ...]) -> _EinsumParts:
    """Splits the kernel's letters into contracted and produced ones (ellipses resolved)."""
    ops, out, _ = opt_einsum.parser.parse_einsum_input((eq, x, jax.ShapeDtypeStruct(kernel_shape, jnp.float32)))
    lhs, rhs = ops.split(",")
    if len(set(rhs)) != len(rhs):
        raise ValueError(f"einsum {eq!r} repeats a kernel letter")
    shared = [c for c in rhs if c in lhs and c in out]
    if shared:
        letters = "".join(shared)
        raise ValueError(f"einsum {eq!r} has kernel batch letters {letters} that one low-rank pair cannot factor")
    lonely = [c for c in rhs if c not in lhs and c not in out]
    if lonely:
        raise ValueError(f"einsum {eq!r} sums kernel letters {''.join(lonely)} on their own")
    contracted = "".join(c for c in rhs if c in lhs)
    produced = "".join(c for c in rhs if c in out)
    perm = tuple(rhs.index(c) for c in contracted + produced)
    in_shape = tuple(kernel_shape[rhs.index(c)] for c in contracted)
    out_shape = tuple(kernel_shape[rhs.index(c)] for c in produced)
    out_perm = tuple(produced.index(c) for c in out if c in produced)
    return _EinsumParts(lhs, rhs, out, contracted, produced, perm, in_shape, out_shape, out_perm)


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
class LinenLoraSpec:
    """Which Linen layers carry which adapters, with their settings: static config for
    :func:`intercept` and :func:`merge`. Frozen and hashable, so it can be a ``jit`` static arg.

    Attributes:
      layers: one entry per adapted layer, in discovery order.
      active: the adapters the forward applies (the first one injected, until changed with
        :meth:`with_active`).
    """

    layers: tuple[LinenLayerSpec, ...]
    active: tuple[str, ...]

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for layer in self.layers for n, _ in layer.adapters))

    def layer(self, name: str) -> LinenLayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no adapted layer {name!r}; adapted: {[layer.name for layer in self.layers]}")

    def with_active(self, *names: str) -> LinenLoraSpec:
        """The same spec with ``names`` (possibly none) as the active adapters."""
        unknown = [n for n in names if n not in self.adapter_names]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; known: {list(self.adapter_names)}")
        return dataclasses.replace(self, active=tuple(names))


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
        DenseGeneral and Einsum layer except one named ``lm_head``.
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
        adapter already exists, or ``params`` does not fit the model.
      TypeError: a matched module is a layer LoRA cannot adapt (names the path and class).
      NotImplementedError: an option the Linen path does not implement (``modules_to_save``,
        ``bias`` other than ``"none"``; DoRA, ``lora_bias`` or PiSSA/OLoRA where unsupported).

    Example:
      >>> class Mlp(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
      >>> model, x = Mlp(), jnp.ones((2, 4))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> config = LoraConfig(r=2, target_modules=["hidden"])
      >>> params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
      >>> jax.tree.map(jnp.shape, split(params).adapters)
      {'hidden': {'lora_A': {'default': (4, 2)}, 'lora_B': {'default': (2, 8)}}}
      >>> with intercept(spec):
      ...     y = model.apply({"params": params}, x)
      >>> y.shape
      (2, 3)
    """
    validate_adapter_name(adapter_name)
    if config.modules_to_save:
        raise NotImplementedError(f"modules_to_save={list(config.modules_to_save)} is not supported for Linen params")
    if config.bias != "none":
        raise NotImplementedError(f"bias={config.bias!r} is not supported for Linen params; use bias='none'")
    layers = discover_layers(module, *sample_args, **(sample_kwargs or {}))
    if is_all_linear(config.target_modules):
        linear = [n for n, i in layers.items() if i.kind in _LINEAR_KINDS]
        output = "lm_head" if "lm_head" in layers else None
        config = dataclasses.replace(config, target_modules=tuple(expand_all_linear(linear, output, config.task_type)))
    targets = match_modules(config, list(layers))
    bad = [layers[n] for n in targets if layers[n].reason is not None]
    if bad:
        listed = "; ".join(f"{i.name} ({i.cls}): {i.reason}" for i in bad[:10])
        raise TypeError(f"LoRA cannot adapt {listed}. Supported layers: {', '.join(SUPPORTED_LAYERS)}")

    previous = {layer.name: layer for layer in spec.layers} if spec is not None else {}
    if spec is not None and adapter_name in spec.adapter_names:
        raise ValueError(f"adapter {adapter_name!r} already exists; existing: {list(spec.adapter_names)}")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower() in ("gaussian", "olora"):  # PEFT ignores their case
        init = init.lower()
    new_params = params
    new_layers = dict(previous)
    for i, name in enumerate(targets):
        info = layers[name]
        r, alpha, scaling = config.scaling_for(name)
        lora = LoraSpec(
            r=r,
            alpha=alpha,
            scaling=scaling,
            dropout=float(config.lora_dropout),
            use_dora=bool(config.use_dora),
            lora_bias=bool(config.lora_bias),
        )
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
    active = spec.active if spec is not None else (adapter_name,)
    return new_params, LinenLoraSpec(layers=tuple(new_layers.values()), active=active)


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
    if info.kind == "embed":
        if lora.use_dora or lora.lora_bias:
            raise NotImplementedError(f"{info.name}: DoRA and lora_bias on embeddings are not supported")
        if isinstance(init, str) and init != "gaussian":
            raise NotImplementedError(f"{info.name}: init_lora_weights={init!r} is not supported on embeddings")
    if info.kind == "conv" and isinstance(init, str) and init != "gaussian":
        raise NotImplementedError(f"{info.name}: init_lora_weights={init!r} is not supported on convolutions")
    if lora.lora_bias and "bias" not in node:
        raise ValueError(f"{info.name}: lora_bias=True needs a base bias to merge into, and {where} has none")


def _init_adapter(info: LayerInfo, lora: LoraSpec, kernel, key, init) -> tuple[dict, Any]:
    """Initial adapter weights (stacked like the kernel) and the kernel (rewritten by PiSSA/OLoRA)."""
    decompose = isinstance(init, str) and init.startswith(("pissa", "olora"))
    weights, new_w = _init_weights(info, lora, init, key, flax_meta.unbox(kernel))
    return weights, (_rebox(kernel, new_w) if decompose else kernel)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one compile per layer, not one per op
def _init_weights(info: LayerInfo, lora: LoraSpec, init, key, w):
    n_in, n_out = math.prod(info.in_shape), math.prod(info.out_shape)
    a_shape = info.kernel_shape[:-1] + (lora.r,) if info.kind == "conv" else (n_in, lora.r)
    decompose = isinstance(init, str) and init.startswith(("pissa", "olora"))

    def one(k, w_one):
        if decompose:
            a, b, w_res = _decompose(init, _to_2d(info, w_one), lora)
            w_one = _from_2d(info, w_res).astype(w_one.dtype)
        else:
            a, b = init_factors(k, "embed" if info.kind == "embed" else "linear", init, n_in, n_out, lora.r)
        out = {"lora_A": a.astype(jnp.float32).reshape(a_shape), "lora_B": b.astype(jnp.float32)}
        if lora.lora_bias:
            out["lora_B_bias"] = jnp.zeros((n_out,), jnp.float32)
        if lora.use_dora:
            merged = _to_2d(info, w_one.astype(jnp.float32)) + lora.scaling * (a @ b)
            out["lora_magnitude_vector"] = jnp.linalg.norm(merged, axis=0)
        return out, w_one

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
def intercept(spec: LinenLoraSpec):
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
      >>> merged = model.apply({"params": merge(params, spec)}, x)
      >>> bool(jnp.allclose(jax.jit(forward)(params, x), merged, atol=1e-5))
      True

    Args:
      spec: from :func:`inject`.
    """
    layers = {layer.name: layer for layer in spec.layers}
    active = spec.active

    def interceptor(next_fun, args, kwargs, ctx):
        layer = layers.get(".".join(str(p) for p in ctx.module.path)) if ctx.method_name == "__call__" else None
        busy = _busy.__dict__.setdefault("modules", set())
        if layer is None or id(ctx.module) in busy:  # a subclass calling super().__call__ adds once
            return next_fun(*args, **kwargs)
        busy.add(id(ctx.module))
        try:
            y = next_fun(*args, **kwargs)
        finally:
            busy.discard(id(ctx.module))
        live = [(n, s) for n, s in layer.adapters if n in active]
        return _add_adapters(layer, live, ctx.module, args, kwargs, y) if live else y

    with nn.intercept_methods(interceptor):
        yield


class _Call(NamedTuple):
    """How one call contracts its input (the parts that depend on the input's rank)."""

    x: Any
    axes: tuple[int, ...] = ()  # DenseGeneral: the contracted input axes
    einsum: _EinsumParts | None = None
    rank_letter: str = ""


def _call_info(layer: LinenLayerSpec, module: nn.Module, args, kwargs) -> _Call:
    x = args[0] if args else kwargs["inputs"]
    if layer.kind == "dense_general":
        return _Call(x, axes=tuple(a % x.ndim for a in _as_tuple(module.axis)))
    if layer.kind == "einsum":
        kernel_shape = tuple(_read(module, "kernel").shape)
        parts = _einsum_parts(_einsum_str(module, args, kwargs), x, kernel_shape)
        letter = next(c for c in string.ascii_letters if c not in parts.lhs + parts.rhs + parts.out)
        return _Call(x, einsum=parts, rank_letter=letter)
    return _Call(x)


def _add_adapters(layer: LinenLayerSpec, live, module: nn.Module, args, kwargs, y):
    call = _call_info(layer, module, args, kwargs)
    x = call.x
    for name, s in live:
        a, b = _adapter_weight(module, layer, "lora_A", name), _adapter_weight(module, layer, "lora_B", name)
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
        e, R = call.einsum, call.rank_letter
        keep = "".join(dict.fromkeys(c for c in e.lhs if c not in e.contracted))
        return jnp.einsum(f"{e.lhs},{e.contracted}{R}->{keep}{R}", h, a.reshape(layer.in_shape + (r,)))
    return _conv(module, h, a)  # conv: A is a kernel with r output channels, as PEFT's lora_A


def _up(layer: LinenLayerSpec, call: _Call, z, b):
    """The rank-r activations times ``B``, in the layer's output layout."""
    if layer.kind == "dense_general":
        return (z @ b).reshape(z.shape[:-1] + layer.out_shape)
    if layer.kind == "einsum":
        e, R = call.einsum, call.rank_letter
        keep = "".join(dict.fromkeys(c for c in e.lhs if c not in e.contracted))
        return jnp.einsum(f"{keep}{R},{R}{e.produced}->{e.out}", z, b.reshape((b.shape[0],) + layer.out_shape))
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
    """PEFT's DoRA: ``(f - 1) * base(x) + f * s * lora`` with ``f = m / ||W + s A B||`` per output."""
    w = _read(module, layer.kernel_name).astype(jnp.float32)
    weight = _to_2d(layer, w) + s.scaling * (a.reshape(-1, a.shape[-1]) @ b)
    norm = jax.lax.stop_gradient(jnp.linalg.norm(weight, axis=0))
    factor = _adapter_weight(module, layer, "lora_magnitude_vector", name) / norm
    if s.dropout > 0 and h is not call.x:
        base = _linear(layer, module, call, hf, w)  # PEFT recomputes x @ W on the dropped-out input
    else:
        bias = _read(module, "bias")
        base = y.astype(jnp.float32)
        if bias is not None:
            base = base - _bias_like_output(layer, call, bias.astype(jnp.float32), base.ndim)
    ndim = lora.ndim
    return _per_output(layer, call, factor - 1, ndim) * base + _per_output(layer, call, factor, ndim) * s.scaling * lora


def _read(module: nn.Module, name: str):
    value = module.get_variable("params", name)
    return None if value is None else flax_meta.unbox(value)


def _adapter_weight(module: nn.Module, layer: LinenLayerSpec, key: str, name: str):
    store = module.get_variable("params", key)
    if store is None or name not in store:
        raise ValueError(
            f"{layer.name}: params have no {key}/{name}; apply the model with the params that "
            "inject returned (or combine(base, adapters))"
        )
    return flax_meta.unbox(store[name])


# --------------------------------------------------------------------------------------------
# Merge


def merge(params: Mapping, spec: LinenLoraSpec, adapter_names: Sequence[str] | None = None) -> dict:
    """Folds adapters into the base weights and drops every adapter leaf (for inference, export).

    ``W' = W + s * dW`` per adapter, in order; DoRA rescales each output unit to its magnitude,
    and ``lora_bias`` adds ``s * b`` to the base bias. Stacked scan axes are handled per layer.
    ``model.apply({"params": merge(params, spec)}, x)`` without :func:`intercept` then equals
    the intercepted forward with these adapters active.

    Args:
      params: params holding the adapters (from :func:`inject` or :func:`combine`).
      spec: from :func:`inject`.
      adapter_names: the adapters to fold in; the active ones by default.

    Returns:
      New base params (the input is not modified).

    Raises:
      ValueError: an unknown adapter name.
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
    return split(out).base


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_layer(layer: LinenLayerSpec, live, kernel, bias, weights):
    n = len(layer.stacked)
    new_kernel = _over_stack(lambda w, ad: _merged_kernel(layer, live, w, ad), n)(kernel, weights)
    new_bias = None if bias is None else _over_stack(lambda b, ad: _merged_bias(layer, live, b, ad), n)(bias, weights)
    return new_kernel, new_bias


def _merged_kernel(layer: LinenLayerSpec, live, w, weights):
    w2 = _to_2d(layer, w.astype(jnp.float32))
    for name, s in live:
        a, b = weights[name]["lora_A"], weights[name]["lora_B"]
        w2 = w2 + s.scaling * (a.reshape(-1, a.shape[-1]) @ b)
        if s.use_dora:
            w2 = w2 * (weights[name]["lora_magnitude_vector"] / jnp.linalg.norm(w2, axis=0))[None, :]
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
    """``params`` split in two: the frozen base and the adapter leaves, both with the same nesting."""

    base: Any
    adapters: Any


def split(params: Mapping) -> SplitParams:
    """Splits params into ``(base, adapters)``: ``adapters`` holds exactly the ``lora_*`` subtrees.

    Example:
      >>> base, adapters = split({"q": {"kernel": 1, "lora_A": {"default": 2}}, "o": {"kernel": 3}})
      >>> base
      {'q': {'kernel': 1}, 'o': {'kernel': 3}}
      >>> adapters
      {'q': {'lora_A': {'default': 2}}}
    """

    def go(node):
        base, adapters = {}, {}
        for k, v in node.items():
            if k in ADAPTER_KEYS:
                adapters[k] = v
            elif isinstance(v, Mapping):
                b, a = go(v)
                base[k] = b
                if a:
                    adapters[k] = _like(v, a)
            else:
                base[k] = v
        return _like(node, base), adapters

    base, adapters = go(params)
    return SplitParams(base, _like(params, adapters))


def combine(base: Mapping, adapters: Mapping) -> dict:
    """The inverse of :func:`split`.

    Raises:
      ValueError: both trees hold a leaf at the same path.
    """

    def go(b, a, path):
        out = dict(b)
        for k, v in a.items():
            if k not in out:
                out[k] = v
            elif isinstance(out[k], Mapping) and isinstance(v, Mapping) and k not in ADAPTER_KEYS:
                out[k] = go(out[k], v, path + (k,))
            else:
                raise ValueError(f"both trees hold params/{'/'.join(path + (k,))}")
        return _like(b, out)

    return go(base, adapters, ())


def trainable_labels(params: Mapping) -> Any:
    """``"trainable"`` for adapter leaves, ``"frozen"`` for the rest, in ``params``' structure.

    For ``optax.multi_transform`` (alias ``optax.partition``): with ``set_to_zero`` on the frozen
    label the optimizer keeps no state for the base.

    Example:
      >>> trainable_labels({"q": {"kernel": 1, "lora_A": {"default": 2}}})
      {'q': {'kernel': 'frozen', 'lora_A': {'default': 'trainable'}}}
    """

    def go(node, label):
        if isinstance(node, Mapping):
            return _like(node, {k: go(v, TRAINABLE if k in ADAPTER_KEYS else label) for k, v in node.items()})
        return jax.tree.map(lambda _: label, node)

    return go(params, FROZEN)


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
