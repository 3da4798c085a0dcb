"""A train step jitted with explicit shardings for (trainable, opt_state, rest, batch, key).

The shardings depend on the states' paths and shapes, which a ``GraphDef`` does not carry; so
the step is jitted on its first call (and again only if the states' structure changes), from
the arguments themselves. Only the adapters and the optimizer state are donated; their output
shardings equal their input ones, so the buffers are reused in place step after step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from peftjax.nn._partitioned import traced_partitioned
from peftjax.sharding._mesh import batch_sharding, replicated
from peftjax.sharding._place import opt_state_shardings, state_shardings
from peftjax.sharding._rules import RulesLike, as_rules


class ShardedStep:
    """``step(trainable, opt_state, rest, batch, key) -> (trainable, opt_state, loss)`` over a mesh.

    Built by ``peftjax.make_train_step(..., mesh=mesh, rules=...)``. The arguments must already
    sit on their shards (``shard_model`` before ``split`` and ``optimizer.init``); a host batch
    is split over the data axes by ``jit`` itself. ``lower(...)`` lowers it like ``jax.jit``'s
    (``.compile().as_text()`` shows the partitioned program and its collectives).
    """

    def __init__(self, fn: Callable, mesh: Mesh, rules: RulesLike, *, donate: bool = True):
        self.fn, self.mesh, self.rules, self.donate = fn, mesh, as_rules(rules), donate
        self._compiled: dict = {}

    def shardings(self, trainable, opt_state, rest) -> tuple[Any, Any, Any]:
        """``(trainable, opt_state, rest)`` shardings under this step's mesh and rules."""
        t = state_shardings(trainable, self.mesh, self.rules, weights=rest)
        return t, opt_state_shardings(opt_state, trainable, t, self.mesh), state_shardings(rest, self.mesh, self.rules)

    def jitted(self, trainable, opt_state, rest, batch, key):
        """The ``jax.jit`` object for arguments of this structure."""
        treedef = jax.tree.structure((trainable, opt_state, rest, batch, key))
        # batch lengths vary by bucket: jit recompiles for them, but the shardings stay the same
        cache_key = (treedef, _state_shapes(trainable, opt_state, rest), _ndims(batch))
        fn = self._compiled.get(cache_key)
        if fn is None:
            t, o, r = self.shardings(trainable, opt_state, rest)
            rep = replicated(self.mesh)
            b = jax.tree.map(lambda x: batch_sharding(self.mesh, np.ndim(x)), batch)
            k = jax.tree.map(lambda _: rep, key)
            fn = jax.jit(traced_partitioned(self.fn), in_shardings=(t, o, r, b, k), out_shardings=(t, o, rep),
                         donate_argnums=(0, 1) if self.donate else ())
            self._compiled[cache_key] = fn
        return fn

    def __call__(self, trainable, opt_state, rest, batch, key):
        return self.jitted(trainable, opt_state, rest, batch, key)(trainable, opt_state, rest, batch, key)

    def lower(self, trainable, opt_state, rest, batch, key):
        return self.jitted(trainable, opt_state, rest, batch, key).lower(trainable, opt_state, rest, batch, key)


def _state_shapes(*trees) -> tuple:
    return tuple(tuple(np.shape(x)) for x in jax.tree.leaves(trees))


def _ndims(tree) -> tuple:
    return tuple(np.ndim(x) for x in jax.tree.leaves(tree))
