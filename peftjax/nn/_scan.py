"""Stacked layers: a decoder's identical layers as one module whose weights have a layer axis.

A model built with ``scan_layers=True`` keeps its L layers as :class:`StackedLayers`: one layer
module, created under ``nnx.vmap``, whose every weight is ``[L, ...]``. The forward pass runs
them with ``jax.lax.scan``, so one layer is traced and compiled whatever the depth.

Names stay transformers' names. In checkpoints the stacked ``model.layers.layer.<rest>`` is
read from and written to ``model.layers.0.<rest>`` ... ``model.layers.{L-1}.<rest>``
(``_modeling.iter_hf_params``). Adapter methods see per-layer modules too: injecting, saving and
loading an adapter run on an unstacked view of the model (:func:`unstacked`) and the result is
stacked again, so adapter weights get the layer axis as well and their files carry PEFT's
per-layer keys. Every layer must then carry the same adapters (same targets, ranks, options).

``remat`` chooses what a layer keeps for the backward pass (``jax.checkpoint``):
``"none"`` (everything), ``"full"`` (only its input; the layer is recomputed),
``"dots_saveable"`` (matmul outputs), or another name from ``jax.checkpoint_policies``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import active_dropout_key, dropout_key, fold_key, layer_key
from peftjax.nn._graph import iter_modules

# model options that are not transformers config fields: set on the config, never saved
MODEL_OPTIONS = ("scan_layers", "remat", "expert_dispatch")
REMAT_CHOICES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


def check_remat(remat: str) -> str:
    """Validates a ``remat`` option (``ValueError`` lists the choices)."""
    if remat in ("none", "full") or (isinstance(remat, str) and hasattr(jax.checkpoint_policies, remat)):
        return remat
    raise ValueError(f"remat={remat!r} is not a remat option; choose one of {list(REMAT_CHOICES)}")


def checkpointed(fn: Callable, remat: str) -> Callable:
    """``fn`` under ``jax.checkpoint`` with the ``remat`` policy (``fn`` itself for ``"none"``)."""
    if check_remat(remat) == "none":
        return fn
    policy = None if remat == "full" else getattr(jax.checkpoint_policies, remat)
    return jax.checkpoint(fn, policy=policy)


class StackedLayers(nnx.Module):
    """``num_layers`` layers built by ``make_layer(rngs)``, stored stacked along a leading axis.

    Indexing and iteration give per-layer modules (slices, for the KV-cache and prefix paths);
    :meth:`scan` runs all layers with ``jax.lax.scan``.
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return make_layer(rngs)

        self.layer = create(rngs)
        self.num_layers = num_layers

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, i: int) -> nnx.Module:
        graphdef, state = nnx.split(self.layer)
        return nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state))

    def __iter__(self) -> Iterator[nnx.Module]:
        return (self[i] for i in range(self.num_layers))

    def scan(self, fn: Callable, x: jax.Array, remat: str = "none", key: jax.Array | None = None,
             stop: int | None = None) -> jax.Array:
        """``x = fn(layer, x, layer_key)`` for every layer (the first ``stop`` with ``stop``), as one
        ``jax.lax.scan``.

        ``layer_key`` is ``key`` folded with the layer index (``None`` without a key): the model's
        own dropout. Adapter dropout draws a different mask in each layer too: the active key is
        folded with the layer index (all layers share their module paths).
        """
        stop = self.num_layers if stop is None else stop
        if stop == 0:
            return x
        graphdef, state = nnx.split(self.layer)
        if stop < self.num_layers:
            state = jax.tree.map(lambda v: v[:stop], state)
        call = _stacked_call(graphdef, fn, key)

        def body(h, xs):
            i, layer_state = xs
            return call(i, layer_state, h), None

        x, _ = jax.lax.scan(checkpointed(body, remat), x, (jnp.arange(stop), state))
        return x

    def run_one(self, i: int, fn: Callable, x: jax.Array, remat: str = "none",
                key: jax.Array | None = None) -> jax.Array:
        """``fn(layer_i, x, layer_key)`` outside the scan, with the keys :meth:`scan` gives layer ``i``."""
        graphdef, state = nnx.split(self[i])
        call = _stacked_call(graphdef, fn, key)
        return checkpointed(lambda layer_state, h: call(i, layer_state, h), remat)(state, x)


def _stacked_call(graphdef, fn: Callable, key: jax.Array | None) -> Callable:
    """``call(i, layer_state, h)``: ``fn`` on stacked layer ``i`` with its keys, the model's
    (``key`` folded with ``i``) and the adapters' (the active key folded with ``i``, as all layers
    share their module paths); ``i`` static or traced."""
    active = active_dropout_key()

    def call(i, layer_state, h):
        with dropout_key(None if active is None else fold_key(active, i)):
            return fn(nnx.merge(graphdef, layer_state), h, layer_key(key, i))

    return call


def make_layers(config, make_layer: Callable[[int, nnx.Rngs], nnx.Module], *, rngs: nnx.Rngs):
    """``config.num_hidden_layers`` layers, ``make_layer(index, rngs)`` each: stacked when the
    config carries ``scan_layers=True`` (every layer then built as index 0, so the caller must
    refuse configs whose layers differ), else an ``nnx.List``."""
    n = config.num_hidden_layers
    if getattr(config, "scan_layers", False):
        return StackedLayers(lambda r: make_layer(0, r), n, rngs=rngs)
    return nnx.List([make_layer(i, rngs) for i in range(n)])


def run_layers(layers, fn: Callable, x: jax.Array, remat: str = "none", key: jax.Array | None = None,
               stop: int | None = None):
    """``x = fn(layer, x, layer_key)`` over ``layers`` (the first ``stop`` with ``stop``): scanned
    when stacked, else a loop; each under ``remat``. ``layer_key`` is ``key`` folded with the
    layer's index (``None`` without a key), so a stacked and an unstacked model draw the same
    dropout masks."""
    if isinstance(layers, StackedLayers):
        return layers.scan(fn, x, remat, key, stop)
    for i in range(len(layers) if stop is None else stop):
        x = run_layer(layers, i, fn, x, remat, key)
    return x


def run_layer(layers, i: int, fn: Callable, x: jax.Array, remat: str = "none", key: jax.Array | None = None):
    """``fn(layers[i], x, layer_key)`` under ``remat``, with the keys :func:`run_layers` gives layer
    ``i`` (stacked or not): a model runs its last layer apart from the others this way."""
    if isinstance(layers, StackedLayers):
        return layers.run_one(i, fn, x, remat, key)
    layer, k = layers[i], layer_key(key, i)
    if remat == "none":
        return fn(layer, x, k)
    graphdef, state = nnx.split(layer)
    return checkpointed(lambda s, h, lk: fn(nnx.merge(graphdef, s), h, lk), remat)(state, x, k)


# ---------------------------------------------------------------------------- unstacked views


def _find_stacks(model: nnx.Module) -> list[tuple[tuple, StackedLayers]]:
    return [(p, n) for p, n in iter_modules(model) if isinstance(n, StackedLayers) and p]


def has_stacked_layers(model: nnx.Module) -> bool:
    """Whether ``model`` holds :class:`StackedLayers` (below its root)."""
    return bool(_find_stacks(model))


def _node_at(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def _put(parent, attr, value) -> None:
    if isinstance(attr, int):
        parent[attr] = value
    else:
        setattr(parent, attr, value)


Origin = Mapping[int, tuple[jax.Array, int, jax.Array]]


def stack_modules(layers, path: str, origin: Origin | None = None) -> nnx.Module:
    """One module whose weights stack the (structurally identical) ``layers``' weights.

    Strings an adapter recorded from a layer's path (``model.layers.3.self_attn.q_proj``)
    become layer-independent (``model.layers.*.self_attn.q_proj``) first. ``origin`` maps
    ``id`` of a per-layer array to ``(stacked array, layer index, the array)`` it was sliced from:
    a weight whose layers are all still those slices, in order, is the stacked array again,
    not a new copy.

    Raises:
      ValueError: the layers differ in structure (e.g. an adapter on some layers only, or
        different ranks per layer), naming the first layer that differs.
    """
    for i, layer in enumerate(layers):
        own, shared = f"{path}.{i}.", f"{path}.*."
        for _, node in nnx.iter_graph(layer):
            if isinstance(node, nnx.Module):
                for attr, value in list(vars(node).items()):
                    if isinstance(value, str) and value.startswith(own):
                        setattr(node, attr, shared + value[len(own):])
    splits = [nnx.split(layer) for layer in layers]
    graphdef = splits[0][0]
    for i, (other, _) in enumerate(splits[1:], start=1):
        if other != graphdef:
            raise ValueError(
                f"{path}: layer {i} differs in structure from layer 0, so the layers cannot be stacked "
                f"(scan_layers=True needs the same adapters, targets and ranks on every layer; "
                f"layers_to_transform, per-layer rank_pattern and the like need scan_layers=False)"
            )
    origin = origin or {}

    def restack(*xs):
        sources = [origin.get(id(x)) for x in xs]
        if all(sources) and all(
            part is x and src is sources[0][0] and i == j for i, ((src, j, part), x) in enumerate(zip(sources, xs))
        ):
            return sources[0][0]  # unchanged (a frozen base weight): no copy
        return jnp.stack(xs)

    state = jax.tree.map(restack, *[s for _, s in splits])
    return nnx.merge(graphdef, state)


def _slices(stack: StackedLayers) -> tuple[list[nnx.Module], Origin]:
    """``stack``'s layers as modules, and where each of their arrays was sliced from."""
    graphdef, state = nnx.split(stack.layer)
    whole = jax.tree.leaves(state)
    layers, origin = [], {}
    for i in range(stack.num_layers):
        # a model built abstractly (nnx.eval_shape) gives abstract layers, to be filled by a loader
        part = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype)
                            if isinstance(v, jax.ShapeDtypeStruct) else v[i], state)
        for src, x in zip(whole, jax.tree.leaves(part)):
            origin[id(x)] = (src, i, x)  # the slice itself too: an id is only unique while its array lives
        layers.append(nnx.merge(graphdef, part))
    return layers, origin


@contextlib.contextmanager
def unstacked(model: nnx.Module, *, write: bool):
    """Inside the block, every :class:`StackedLayers` of ``model`` is an ``nnx.List`` of layers.

    Module names are then transformers' per-layer names, so adapter code (targeting, PEFT
    keys) needs no knowledge of stacking. With ``write``, the layers are stacked again on
    exit (their changes kept); otherwise the original stacked module is put back. If the
    block raises, the model is left as it was.
    """
    stacks = _find_stacks(model)
    origins = []
    for path, stack in stacks:
        layers, origin = _slices(stack)
        origins.append(origin)
        _put(_node_at(model, path[:-1]), path[-1], nnx.List(layers))
    try:
        yield model
        restacked = [
            stack_modules(list(_node_at(model, path)), ".".join(str(p) for p in path), origin)
            if write
            else stack.layer
            for (path, stack), origin in zip(stacks, origins)
        ]
    finally:  # on success or failure, the stacked modules go back (updated only on success)
        for path, stack in stacks:
            _put(_node_at(model, path[:-1]), path[-1], stack)
    for (_, stack), layer in zip(stacks, restacked):
        stack.layer = layer


def stack_aware(fn: Callable, *, write: bool) -> Callable:
    """``fn(model, ...)`` run on :func:`unstacked` ``model`` (``fn`` itself for unstacked models)."""

    def wrapped(model, *args, **kwargs):
        if not has_stacked_layers(model):
            return fn(model, *args, **kwargs)
        with unstacked(model, write=write):
            return fn(model, *args, **kwargs)

    wrapped.__wrapped__ = fn
    wrapped.__name__ = getattr(fn, "__name__", "wrapped")
    wrapped.__doc__ = fn.__doc__
    return wrapped
