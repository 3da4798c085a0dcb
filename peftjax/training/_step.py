"""The functional core of training: split a model into adapters and base, and step the adapters.

    graphdef, adapters, base = split(model)
    opt_state = optimizer.init(adapters)             # moments exist only for adapter weights
    step = make_train_step(graphdef, optimizer)
    adapters, opt_state, loss = step(adapters, opt_state, base, batch, key)

The step differentiates only ``adapters``, donates their buffers and the optimizer state, and
never returns ``base``, which therefore stays bit-identical. With ``mesh=`` (and ``rules=``) it is
jitted with explicit shardings for all five arguments instead (``peftjax.sharding``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from peftjax.nn._dropout import dropout_key, own_loss
from peftjax.training._memory import release_host_memory
from peftjax.tuners.base import TRAINABLE, project_adapters


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable, rest)``: adapter (and other trainable) weights, then everything else."""
    return nnx.split(model, TRAINABLE, ...)


def combine(graphdef: nnx.GraphDef, trainable: nnx.State, rest: nnx.State) -> nnx.Module:
    """The inverse of :func:`split`."""
    return nnx.merge(graphdef, trainable, rest)


def optax_labels(state: nnx.State) -> Any:
    """``"trainable"`` / ``"frozen"`` labels for a model's full param state.

    For ``optax.multi_transform`` (alias ``optax.partition``) over the whole model:

    >>> tx = optax.multi_transform(  # doctest: +SKIP
    ...     {"trainable": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, optax_labels(state))
    """
    return jax.tree.map(
        lambda v: "trainable" if _is_trainable(v) else "frozen",
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _is_trainable(variable) -> bool:
    from peftjax.tuners.base import AdapterParam, TrainableParam

    return isinstance(variable, (AdapterParam, TrainableParam))


default_loss = own_loss  # the model's own loss (``model(**batch).loss``), its dropout under the step's key


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    loss_fn: Callable[[nnx.Module, Any], jax.Array] = default_loss,
    *,
    donate: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> Callable:
    """A jitted ``step(trainable, opt_state, rest, batch, key) -> (trainable, opt_state, loss)``.

    Args:
      graphdef: from :func:`split`.
      optimizer: any optax transformation; initialise it on ``trainable`` only.
      loss_fn: ``loss_fn(model, batch) -> scalar``; by default the model's own loss.
      donate: donate the adapter and optimizer buffers (the base is never donated).
      mesh: a device mesh (``peftjax.sharding.make_mesh``): the step is jitted with explicit
        ``in_shardings``/``out_shardings``, the batch's rows split over the data axes. Place the
        model first with ``peftjax.sharding.shard_model(model, mesh, rules)``.
      rules: the sharding rules with ``mesh`` (a preset such as ``"fsdp+tp"``, ``(regex, spec)``
        pairs, or ``peftjax.sharding.ShardingRules``); default ``"dp"``.

    The ``key`` drives dropout, the adapters' and (with the default loss) the model's own;
    ``None`` disables it. Donated buffers are gone after the call: keep the returned ``trainable``
    and put it back with ``peft_model.update(trainable)`` before saving.

    The first call compiles the step ahead and hands the compiler's freed heap back to the system
    before running it (:class:`CompiledFirst`), as the ``Trainer`` does: the process's peak
    resident memory is then the step's buffers, not those plus the compiler's leftovers.
    """

    def loss_of(trainable, rest, batch, key):
        model = nnx.merge(graphdef, trainable, rest)
        with dropout_key(key):
            return loss_fn(model, batch)

    def step(trainable, opt_state, rest, batch, key):
        _refuse_adalora(trainable)
        loss, grads = jax.value_and_grad(loss_of)(trainable, rest, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        # a method trained within a set (CPT) is projected back onto it, as PEFT does before its next forward
        return project_adapters(optax.apply_updates(trainable, updates)), opt_state, loss

    return jit_step(step, donate=donate, mesh=mesh, rules=rules)


def _refuse_adalora(trainable) -> None:
    """A trainable AdaLoRA adapter (``lora_E``) needs its rank allocator and regulariser, which this
    step would silently skip: it is refused, naming the step that runs them."""
    for path, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "lora_E" in names:
            where = ".".join(n for n in names[: names.index("lora_E")])
            raise ValueError(
                f"make_train_step: {where} holds a trainable AdaLoRA adapter; its rank allocator "
                "(update_and_allocate) and orthogonal regulariser run in peftjax.make_adalora_train_step "
                "and the Trainer, not in a plain step. Use one of those, or freeze the adapter")


def jit_step(step: Callable, *, donate: bool = True, mesh=None, rules: Any = None) -> Callable:
    """Jits ``step(trainable, opt_state, rest, batch, key)``, donating only its first two arguments.

    With a ``mesh``, a ``peftjax.sharding.ShardedStep``: explicit shardings under ``rules``. Either
    way it comes wrapped in :class:`CompiledFirst`.
    """
    if mesh is None:
        return CompiledFirst(jax.jit(step, donate_argnums=(0, 1) if donate else ()))
    from peftjax.sharding._jit import ShardedStep

    return CompiledFirst(ShardedStep(step, mesh, rules, donate=donate))


class CompiledFirst:
    """A step (anything with ``lower(*args)`` and a call, as ``jax.jit`` functions have) whose first
    call compiles ahead, then returns the compiler's freed heap to the system
    (:func:`release_host_memory`) before the step's buffers are allocated.

    It collects the young generations of Python objects only (what tracing and lowering left),
    not every object: the full collection added nothing to the peak (``benchmarks/speed_vs_peft.py``
    0.72-0.74 GiB and ``benchmarks/finetune_vs_peft.py`` 0.72-0.82 GiB, either way) and took a
    ninth of the test suite's time, a step's first call in a process holding many models.

    The call then runs the executable the compilation produced (JAX caches it). Without this, the
    compiler's freed heap and the step's buffers are resident together and the process peaks
    higher. Every other attribute (``lower``, ``trace``, ...) is the wrapped step's.
    """

    def __init__(self, wrapped: Callable):
        self.wrapped = wrapped
        self._first = True

    def __call__(self, *args, **kwargs):
        if self._first:
            self._first = False
            self.wrapped.lower(*args, **kwargs).compile()
            release_host_memory(generation=1)
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)
