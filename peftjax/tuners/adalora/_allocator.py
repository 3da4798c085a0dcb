"""AdaLoRA's rank allocator and orthogonal regularisation as pure functions over the adapter pytree.

PEFT (``peft/tuners/adalora/layer.py``, ``RankAllocator``; ``model.py``, ``update_and_allocate``)
keeps the importance statistics on a stateful object and reads ``p.grad``. Here the statistics are
a :class:`RankAllocatorState` pytree, and the training loop passes the step's gradients:

    graphdef, adapters, base = peftjax.split(peft_model.base_model)
    step = peftjax.make_adalora_train_step(graphdef, optax.adam(1e-3), config)  # + orth. regulariser
    alloc = init_rank_allocator(adapters, config)
    for i, batch in enumerate(batches):
        adapters, opt_state, loss, grads = step(adapters, opt_state, base, batch, key)
        adapters, alloc, config = update_and_allocate(alloc, adapters, grads, i, config)
    peft_model.update(adapters)
    peft_model.peft_config["default"] = config      # carries the final rank_pattern

Per weight ``p`` of ``lora_A`` / ``lora_E`` / ``lora_B``: ``ipt = |p · grad|`` (``p`` after the
optimizer step, as PEFT calls it after ``optimizer.step()``), ``ema_ipt ← β1 ema_ipt + (1-β1) ipt``,
``ema_unc ← β2 ema_unc + (1-β2) |ipt - ema_ipt|``; a triplet's score is
``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`` with ``s = ema_ipt · ema_unc``. When the budget
schedule says so, the ``init_bgt - budget`` lowest scores (and ties) zero their ``E`` entries.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import AdaLoraConfig
from peftjax.tuners.adalora._layer import AdaLoraLayer
from peftjax.tuners.adalora._model import rank_pattern_key
from peftjax.tuners.base import named_modules

_FACTORS = ("lora_A", "lora_E", "lora_B")


def _parts(path) -> list:
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
    if out and out[-1] == "value":  # an nnx.Variable's value
        out.pop()
    return out


def _factor_of(path, adapter_name: str) -> tuple[str, str] | None:
    parts = _parts(path)
    if len(parts) >= 3 and parts[-1] == adapter_name and parts[-2] in _FACTORS:
        return ".".join(parts[:-2]), parts[-2]
    return None


def adalora_factors(tree: Any, adapter_name: str = "default") -> dict[str, dict[str, jax.Array]]:
    """``{module path: {"lora_A": [r, in], "lora_E": [r, 1], "lora_B": [out, r]}}`` found in ``tree``.

    Args:
      tree: an adapter state (``peftjax.split``'s second output) or its gradients.
      adapter_name: which adapter.

    Raises:
      NotImplementedError: the factors are stacked (``scan_layers=True``).
    """
    out: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        found = _factor_of(path, adapter_name)
        if found is not None:
            if leaf.ndim != 2:
                raise NotImplementedError(f"AdaLoRA's rank allocator on stacked layers ({found[0]}.{found[1]} has "
                                          f"shape {leaf.shape}) is not implemented; build with scan_layers=False")
            out.setdefault(found[0], {})[found[1]] = leaf
    return out


class RankAllocatorState(NamedTuple):
    """The allocator's statistics (PEFT's ``exp_avg_ipt`` / ``exp_avg_unc``), ``None`` until the first update.

    Attributes:
      init_bgt: the initial total rank (the sum of every layer's ``r``).
      target_bgt: ``target_r`` times the number of layers.
      exp_avg_ipt: the smoothed sensitivity, as :func:`adalora_factors` lays it out.
      exp_avg_unc: the smoothed uncertainty.
    """

    init_bgt: int
    target_bgt: int
    exp_avg_ipt: dict | None = None
    exp_avg_unc: dict | None = None


def init_rank_allocator(adapters: Any, config: AdaLoraConfig, adapter_name: str = "default") -> RankAllocatorState:
    """A fresh allocator for ``adapter_name``'s factors in ``adapters`` (PEFT's ``RankAllocator.__init__``)."""
    factors = adalora_factors(adapters, adapter_name)
    if not factors:
        raise ValueError(f"no AdaLoRA factors of adapter {adapter_name!r} in the given state")
    init_bgt = sum(int(f["lora_A"].shape[0]) for f in factors.values())
    return RankAllocatorState(init_bgt, config.target_r * len(factors))


def budget_schedule(config: AdaLoraConfig, init_bgt: int, target_bgt: int, step: int) -> tuple[int, bool]:
    """``(budget, mask now?)`` at ``step``: PEFT's cubic schedule, in Python floats as PEFT computes it."""
    tinit, tfinal, total_step = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % config.deltaT == 0


@functools.partial(jax.jit, static_argnames=("beta1", "beta2"))
def _update_ipt(exp_avg_ipt, exp_avg_unc, params, grads, *, beta1: float, beta2: float):
    ipt = jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)
    if exp_avg_ipt is None:
        exp_avg_ipt = jax.tree.map(jnp.zeros_like, params)
        exp_avg_unc = jax.tree.map(jnp.zeros_like, params)
    exp_avg_ipt = jax.tree.map(lambda e, i: beta1 * e + (1 - beta1) * i, exp_avg_ipt, ipt)
    exp_avg_unc = jax.tree.map(lambda u, i, e: beta2 * u + (1 - beta2) * jnp.abs(i - e), exp_avg_unc, ipt, exp_avg_ipt)
    return exp_avg_ipt, exp_avg_unc


@jax.jit
def _keep_masks(exp_avg_ipt, exp_avg_unc, k):
    """``{path: [r] bool}``: the triplets scoring above the ``k``-th smallest score (PEFT's kthvalue).

    ``k`` is a value, not a shape: the budget falls every ``deltaT`` steps, and each new budget
    reuses the compiled program."""
    scores = {}
    for path in sorted(exp_avg_ipt):
        s = {n: exp_avg_ipt[path][n] * exp_avg_unc[path][n] for n in _FACTORS}
        ab = jnp.mean(s["lora_A"], axis=1) + jnp.mean(s["lora_B"], axis=0)
        scores[path] = s["lora_E"].reshape(-1) + ab
    threshold = jnp.sort(jnp.concatenate(list(scores.values())))[k - 1]
    return {p: ~(v <= threshold) for p, v in scores.items()}


@functools.partial(jax.jit, static_argnames=("adapter_name",))
def _with_masked_e(adapters: Any, masks: dict[str, jax.Array], adapter_name: str) -> Any:
    def fix(path, leaf):
        found = _factor_of(path, adapter_name)
        if found is None or found[1] != "lora_E" or found[0] not in masks:
            return leaf
        return jnp.where(masks[found[0]].reshape(-1, 1), leaf, jnp.zeros_like(leaf))

    return jax.tree_util.tree_map_with_path(fix, adapters)


def update_and_allocate(
    state: RankAllocatorState, adapters: Any, grads: Any, global_step: int, config: AdaLoraConfig,
    adapter_name: str = "default",
) -> tuple[Any, RankAllocatorState, AdaLoraConfig]:
    """One step of AdaLoRA's budgeting: PEFT's ``AdaLoraModel.update_and_allocate(global_step)``.

    Call it after every optimizer step with that step's gradients. Before ``total_step - tfinal``
    it updates the importance statistics and, when the schedule says so, masks to the budget
    (the config's ``rank_pattern`` follows); at ``total_step - tfinal`` it masks to the final
    budget and resets the statistics; after it, it re-applies the final ``rank_pattern``.

    Args:
      state: from :func:`init_rank_allocator` or the previous call.
      adapters: the adapter state after the optimizer step (``peftjax.split``'s tree).
      grads: the step's gradients, same tree.
      global_step: the step index PEFT's loop passes (0-based in PEFT's examples).
      config: the adapter's config; the returned one carries the current ``rank_pattern``.
      adapter_name: which adapter.

    Returns:
      ``(adapters with masked lora_E, new state, config)``.
    """
    params = adalora_factors(adapters, adapter_name)
    cut = config.total_step - config.tfinal
    if global_step < cut:
        g = adalora_factors(grads, adapter_name)
        missing = sorted(set(params) - set(g))
        if missing:
            raise ValueError(f"grads lack the AdaLoRA factors of {missing[:5]}")
        ipt, unc = _update_ipt(state.exp_avg_ipt, state.exp_avg_unc, params, g,
                               beta1=float(config.beta1), beta2=float(config.beta2))
        state = state._replace(exp_avg_ipt=ipt, exp_avg_unc=unc)
    if global_step > cut:
        masks = {path: jnp.asarray(config.rank_pattern[rank_pattern_key(path)]) for path in params
                 if config.rank_pattern and rank_pattern_key(path) in config.rank_pattern}
        return _with_masked_e(adapters, masks, adapter_name), state, config
    budget, mask_now = budget_schedule(config, state.init_bgt, state.target_bgt, global_step)
    if not (mask_now or global_step == cut) or state.exp_avg_ipt is None:
        return adapters, state, config
    k = state.init_bgt - budget
    if k <= 0:  # nothing to cut (target_r >= init_r; PEFT's kthvalue fails here)
        masks = {p: jnp.ones((v["lora_E"].shape[0],), bool) for p, v in params.items()}
    else:
        masks = _keep_masks(state.exp_avg_ipt, state.exp_avg_unc, np.int32(k))
    adapters = _with_masked_e(adapters, masks, adapter_name)
    pattern = {rank_pattern_key(p): [bool(b) for b in jax.device_get(m)] for p, m in sorted(masks.items())}
    config = dataclasses.replace(config, rank_pattern=pattern)
    if global_step == cut:
        state = state._replace(exp_avg_ipt=None, exp_avg_unc=None)
    return adapters, state, config


def orthogonal_regularization(model: nnx.Module, adapter_name: str = "default") -> jax.Array:
    """PEFT's regulariser: the mean over ``A`` and ``B`` of ``‖A Aᵀ - I‖_F`` / ``‖Bᵀ B - I‖_F``."""
    terms = []
    for module in named_modules(model).values():
        if isinstance(module, AdaLoraLayer) and adapter_name in module.adapter_names():
            a, b = module.lora_A[adapter_name].get_value(), module.lora_B[adapter_name].get_value()
            for cov in (a @ a.T, b.T @ b):
                terms.append(jnp.sqrt(jnp.sum(jnp.square(cov - jnp.eye(cov.shape[0], dtype=cov.dtype)))))
    if not terms:
        return jnp.zeros((), jnp.float32)
    return sum(terms) / len(terms)


def adalora_loss(loss_fn: Callable, config: AdaLoraConfig, adapter_name: str = "default") -> Callable:
    """``loss_fn`` plus ``orth_reg_weight`` times :func:`orthogonal_regularization`, as PEFT's forward adds it."""

    def loss(model, batch):
        return loss_fn(model, batch) + config.orth_reg_weight * orthogonal_regularization(model, adapter_name)

    return loss
