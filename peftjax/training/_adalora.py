"""AdaLoRA's train step: the loss with the orthogonal regulariser, and the rank allocator after each step.

The allocator itself is pure functions over the adapters and their gradients
(``peftjax.tuners.adalora``); this module wires it into a jitted step as ``make_train_step`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from peftjax.config import AdaLoraConfig
from peftjax.nn import dropout_key
from peftjax.training._step import default_loss
from peftjax.tuners.base import project_adapters
from peftjax.tuners.adalora import RankAllocatorState, adalora_loss, init_rank_allocator, update_and_allocate


def make_adalora_train_step(
    graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: AdaLoraConfig,
    loss_fn: Callable | None = None, *, adapter_name: str = "default", donate: bool = True,
) -> Callable:
    """A jitted ``step(trainable, opt_state, rest, batch, key) -> (trainable, opt_state, loss, grads)``.

    Like ``peftjax.make_train_step``, with the orthogonal regulariser in the loss and the
    gradients returned for :func:`update_and_allocate`.
    """
    full_loss = adalora_loss(loss_fn or default_loss, config, adapter_name)

    def loss_of(trainable, rest, batch, key):
        model = nnx.merge(graphdef, trainable, rest)
        with dropout_key(key):
            return full_loss(model, batch)

    def step(trainable, opt_state, rest, batch, key):
        loss, grads = jax.value_and_grad(loss_of)(trainable, rest, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return project_adapters(optax.apply_updates(trainable, updates)), opt_state, loss, grads

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


class AdaLoraStep:
    """A train step that also runs :func:`update_and_allocate` after every call (used by ``peftjax.Trainer``).

    ``step(trainable, opt_state, rest, batch, key) -> (trainable, opt_state, loss)`` like
    ``peftjax.make_train_step``'s; the allocator's statistics and the config (with its current
    ``rank_pattern``) live on the object, ``global_step`` counting the calls from 0.

    Attributes:
      config: the adapter's config, ``rank_pattern`` as of the last call.
      adapter_name: which adapter is budgeted.
      global_step: the calls so far.
    """

    def __init__(self, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: AdaLoraConfig,
                 loss_fn: Callable | None = None, *, adapter_name: str = "default"):
        self.config, self.adapter_name, self.global_step = config, adapter_name, 0
        self._step = make_adalora_train_step(graphdef, optimizer, config, loss_fn, adapter_name=adapter_name)
        self._state: RankAllocatorState | None = None

    def lower(self, *args):
        """Lowers the jitted step (for ahead-of-time compilation)."""
        return self._step.lower(*args)

    def __call__(self, trainable, opt_state, rest, batch, key):
        if self._state is None:
            self._state = init_rank_allocator(trainable, self.config, self.adapter_name)
        trainable, opt_state, loss, grads = self._step(trainable, opt_state, rest, batch, key)
        trainable, self._state, self.config = update_and_allocate(
            self._state, trainable, grads, self.global_step, self.config, self.adapter_name)
        self.global_step += 1
        return trainable, opt_state, loss
