"""Loading a Hugging Face checkpoint straight onto a mesh, one shard at a time.

Each weight is created with ``jax.make_array_from_callback``: every device asks for its own
slice of the memory-mapped safetensors array, so only that slice is read and copied, and no
device (nor the host) ever holds a full copy of a weight that is split.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from peftjax.sharding._place import shard_model
from peftjax.sharding._rules import RulesLike, as_rules, partition_spec


def load_sharded(path: str | os.PathLike, mesh: Mesh, rules: RulesLike, *, dtype=None, **config_overrides):
    """``peftjax.models.from_pretrained`` with every weight placed directly on its shards.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index).
      mesh: the mesh.
      rules: a preset name (``"fsdp"``, ``"tp"``, ...), ``(regex, spec)`` pairs, or :class:`ShardingRules`.
      dtype: parameter and compute dtype (``None``: float32).
      **config_overrides: config fields to override, e.g. ``num_labels=2``.

    Returns:
      The model, every Variable on its shards under ``rules`` (weights absent from the
      checkpoint, such as a new classifier head, are initialised and then placed).

    >>> model = load_sharded("path/to/llama", make_mesh({"fsdp": 8}), "fsdp")  # doctest: +SKIP
    >>> model.lm_head.kernel.get_value().addressable_shards[0].data.shape  # doctest: +SKIP
    (64, 16)

    Raises:
      As ``peftjax.models.from_pretrained``; ``ValueError`` for rules that do not fit the mesh.
    """
    from peftjax.models import from_pretrained
    from peftjax.models._modeling import weight_placement

    rules = as_rules(rules)
    paths: dict[int, dict[int, str]] = {}

    def place(model: nnx.Module, var: nnx.Variable, value: np.ndarray) -> jax.Array:
        if id(model) not in paths:
            paths[id(model)] = {
                id(node): ".".join(str(p) for p in path)
                for path, node in nnx.iter_graph(model)
                if isinstance(node, nnx.Variable)
            }
        abstract = var.get_value()
        shape, dtype_ = tuple(abstract.shape), abstract.dtype
        sharding = NamedSharding(mesh, partition_spec(paths[id(model)][id(var)], shape, mesh, rules))
        return jax.make_array_from_callback(shape, sharding, lambda index: np.asarray(value[index], dtype=dtype_))

    with weight_placement(place):
        model = from_pretrained(path, dtype=dtype, **config_overrides)
    shard_model(model, mesh, rules)  # what the checkpoint did not hold (initialised heads, buffers)
    return model
