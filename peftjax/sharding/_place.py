"""Shardings for whole states: a model's variables, the adapter half of a split, optimizer states.

    mesh = make_mesh({"data": 2, "model": 4})
    shard_model(model, mesh, "tp")                       # every Variable placed on its shards
    graphdef, trainable, rest = peftjax.split(model)
    opt_state = optimizer.init(trainable)                # moments inherit the adapters' shardings
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from peftjax.sharding._mesh import replicated
from peftjax.sharding._rules import ADAPTER_PATH, WEIGHT_LEAVES, RulesLike, as_rules, partition_spec


def dotted(keypath: tuple) -> str:
    """``model.layers.0.self_attn.q_proj.kernel`` from a JAX key path into an NNX state."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], GetAttrKey) and keys[-1].name == "value":
        keys.pop()  # the Variable's own node, not part of the NNX path
    parts = []
    for k in keys:
        if isinstance(k, DictKey):
            parts.append(str(k.key))
        elif isinstance(k, SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return ".".join(parts)


def _as_state(tree: Any) -> Any:
    return nnx.state(tree) if isinstance(tree, nnx.Module) else tree


def state_shardings(state: Any, mesh: Mesh, rules: RulesLike = "dp", *, weights: Any = None) -> Any:
    """A ``NamedSharding`` for every leaf of an NNX state, in the state's own structure.

    Args:
      state: an ``nnx.State`` (or a module: its full state), arrays or ``ShapeDtypeStruct``s.
      mesh: the mesh.
      rules: see :class:`ShardingRules`.
      weights: where to find the weights that adapters follow when ``state`` holds the adapters
        only (the ``trainable`` half of ``peftjax.split``): the ``rest`` half, or the module.

    Returns:
      A pytree like ``state`` whose leaves are ``NamedSharding``s: pass it to ``jax.jit``'s
      ``in_shardings``/``out_shardings`` or ``jax.device_put``.

    >>> graphdef, trainable, rest = peftjax.split(model)  # doctest: +SKIP
    >>> sh = state_shardings(trainable, mesh, "tp", weights=rest)  # doctest: +SKIP
    >>> sh["model"]["layers"][0]["self_attn"]["q_proj"]["lora_B"]["default"].get_value().spec  # doctest: +SKIP
    PartitionSpec(None, 'model')
    """
    rules = as_rules(rules)
    state = _as_state(state)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    shapes = {}
    for tree in (_as_state(weights), state):
        if tree is not None:
            shapes.update({dotted(kp): tuple(np.shape(x)) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]})

    def one(path: str, shape) -> NamedSharding:
        weight = None
        match = ADAPTER_PATH.match(path)
        if match:
            weight = next(((f"{match['layer']}.{leaf}", shapes[f"{match['layer']}.{leaf}"]) for leaf in WEIGHT_LEAVES
                           if f"{match['layer']}.{leaf}" in shapes), None)
        return NamedSharding(mesh, partition_spec(path, shape, mesh, rules, weight=weight))

    return jax.tree_util.tree_unflatten(treedef, [one(dotted(kp), np.shape(x)) for kp, x in flat])


def opt_state_shardings(opt_state: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: each moment like its parameter, the rest replicated.

    A leaf of ``opt_state`` whose key path ends with a parameter's key path and has that
    parameter's shape (Adam's ``mu``/``nu``, ``MultiSteps``' accumulated gradients, the masked
    states of ``optax.multi_transform``) takes the parameter's sharding; counts, schedules and
    anything else are replicated. Works on arrays and on ``jax.eval_shape(optimizer.init, params)``.

    >>> abstract = jax.eval_shape(optimizer.init, trainable)  # doctest: +SKIP
    >>> sh = opt_state_shardings(abstract, trainable, state_shardings(trainable, mesh, "tp", weights=rest),
    ...                          mesh)  # doctest: +SKIP
    >>> opt_state = jax.jit(optimizer.init, out_shardings=sh)(trainable)  # doctest: +SKIP
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_sh = jax.tree.leaves(param_shardings)
    if len(flat_sh) != len(flat_params):
        raise ValueError(f"param_shardings has {len(flat_sh)} leaves for {len(flat_params)} parameters")
    by_path = {tuple(kp): (tuple(np.shape(x)), s) for (kp, x), s in zip(flat_params, flat_sh)}
    depth = max((len(k) for k in by_path), default=0)
    fallback = replicated(mesh)

    def one(keypath, leaf):
        keypath, shape = tuple(keypath), tuple(np.shape(leaf))
        for start in range(max(0, len(keypath) - depth), len(keypath)):
            found = by_path.get(keypath[start:])
            if found is not None and found[0] == shape:
                return found[1]
        return fallback

    return jax.tree_util.tree_map_with_path(one, opt_state)


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``jax.device_put`` that also works across processes for a value every process holds whole."""
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # identical on every process (same seed, same file): each keeps its shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_model(model: nnx.Module, mesh: Mesh, rules: RulesLike = "dp") -> Any:
    """Places every Variable of ``model`` on its shards, in place; returns the shardings.

    Call it before ``peftjax.split`` and ``optimizer.init``, so that the adapters, the frozen
    base and the optimizer moments all start where the train step expects them.

    >>> shard_model(model, make_mesh({"data": 2, "model": 4}), "tp")  # doctest: +SKIP
    >>> model.model.embed_tokens.embedding.get_value().addressable_shards[0].data.shape  # doctest: +SKIP
    (128, 16)
    """
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.tree.map(put, state, shardings))
    return shardings
