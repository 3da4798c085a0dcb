"""Combining LoRA adapters into a new one: PEFT's ``add_weighted_adapter`` and its merge rules.

The merge rules (task arithmetic, TIES, DARE, magnitude pruning) are pure functions of a list
of same-shaped arrays and their weights, as PEFT's ``peft.utils.merge_utils``. DARE's random
pruning takes an explicit ``key``; PEFT draws from torch's global RNG, which cannot be
reproduced, so equality with PEFT holds given the same keep masks (see the tests).

``add_weighted_adapter`` builds each targeted layer's new factors:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the rule is applied to
  the ``A`` factors and to the ``B`` factors separately, each weighted by ``sqrt(|w * s|)`` (the
  sign on ``A``); every adapter must have the same rank.
- ``cat``: ``A`` (times ``w * s``) and ``B`` concatenated along the rank; the rank is the sum.
- ``svd`` and the ``*_svd`` rules: the rule is applied to the scaled deltas ``s * A @ B``, and the
  result is factored by a truncated SVD of rank ``svd_rank`` (default: the largest rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

COMBINATION_TYPES = (
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def _weighted(tensors, weights):
    stacked = jnp.stack(tensors)
    w = jnp.asarray(weights, stacked.dtype).reshape((len(tensors),) + (1,) * (stacked.ndim - 1))
    return stacked, stacked * w


def magnitude_mask(x: jax.Array, density: float) -> jax.Array:
    """Keeps the ``int(density * x.size)`` entries of largest magnitude (PEFT's magnitude pruning)."""
    k = int(density * x.size)
    flat = jnp.zeros((x.size,), x.dtype)
    if k > 0:
        flat = flat.at[jax.lax.top_k(jnp.abs(x).reshape(-1), k)[1]].set(1)
    return flat.reshape(x.shape)


def random_keep_mask(key: jax.Array, density: float, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A Bernoulli(``density``) keep mask (DARE's random pruning)."""
    return jax.random.bernoulli(key, density, shape).astype(dtype)


def prune(x: jax.Array, density: float, method: str, *, key: jax.Array | None = None, rescale: bool = False):
    """PEFT's ``prune``: ``density >= 1`` keeps everything, ``density < 0`` is an error."""
    if density >= 1:
        return x
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")
    if method == "magnitude":
        return x * magnitude_mask(x, density)
    if method == "random":
        kept = x * random_keep_mask(key, density, x.shape, x.dtype)
        return kept / density if rescale else kept
    raise ValueError(f"Unknown method {method}")


def majority_sign_mask(stacked: jax.Array, method: str = "total") -> jax.Array:
    """Where each task's sign agrees with the elected one (``total``: by sum, ``frequency``: by count)."""
    sign = jnp.sign(stacked)
    if method == "total":
        magnitude = stacked.sum(axis=0)
    elif method == "frequency":
        magnitude = sign.sum(axis=0)
    else:
        raise ValueError(f"majority_sign_method: expected 'total' or 'frequency', got {method!r}")
    return sign == jnp.where(magnitude >= 0, 1, -1)[None]


def disjoint_merge(weighted: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean over the tasks whose sign agrees, per entry."""
    return (weighted * mask).sum(axis=0) / jnp.maximum(mask.sum(axis=0), 1.0)


def task_arithmetic(tensors: Sequence[jax.Array], weights) -> jax.Array:
    return _weighted(tensors, weights)[1].sum(axis=0)


def magnitude_prune(tensors, weights, density: float) -> jax.Array:
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors, weights, density: float, majority_sign_method: str = "total") -> jax.Array:
    stacked, weighted = _weighted([prune(t, density, "magnitude") for t in tensors], weights)
    return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))


def _dare_pruned(tensors, density, key):
    keys = jax.random.split(key, len(tensors))
    return [prune(t, density, "random", key=k, rescale=True) for t, k in zip(tensors, keys)]


def dare_linear(tensors, weights, density: float, *, key: jax.Array) -> jax.Array:
    return task_arithmetic(_dare_pruned(tensors, density, key), weights)


def dare_ties(tensors, weights, density: float, majority_sign_method: str = "total", *, key: jax.Array) -> jax.Array:
    stacked, weighted = _weighted(_dare_pruned(tensors, density, key), weights)
    return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))


def combine(rule: str, tensors, weights, *, density=None, majority_sign_method="total", key=None) -> jax.Array:
    """Applies merge rule ``rule`` (a combination type without its ``_svd`` suffix)."""
    if rule in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if rule == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if rule == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if rule == "dare_linear":
        return dare_linear(tensors, weights, density, key=key)
    if rule == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method, key=key)
    raise ValueError(f"Invalid combination type: {rule}")


def combined_factors(
    layer,
    combination_type: str,
    adapters: Sequence[str],
    weights: Sequence[float],
    new_rank: int,
    *,
    density: float | None,
    majority_sign_method: str,
    svd_clamp: float | None,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One layer's new ``(A [n_in, new_rank] in the layer's A shape, B [new_rank, n_out])``."""
    valid = [(n, w) for n, w in zip(adapters, weights) if n in layer.adapter_names()]
    if not valid:
        raise ValueError(f"{layer.adapter_path}: none of {list(adapters)} adapts this layer")
    specs = dict(layer.adapter_specs)
    kasa = [n for n, _ in valid if specs[n].kasa is not None]
    if kasa:  # PEFT's message
        raise ValueError(f"add_weighted_adapter does not support KaSA (problematic adapter '{kasa[0]}')")
    blocks = [n for n, _ in valid if specs[n].block_diagonal is not None]
    if blocks:  # PEFT's combinations read the factors as [r, in] / [out, r] matrices
        raise NotImplementedError(f"{layer.adapter_path}: add_weighted_adapter over BD-LoRA adapters {blocks} "
                                  "(use_bdlora) is not implemented")
    a_of = {n: layer.lora_A[n].get_value().astype(jnp.float32) for n, _ in valid}
    b_of = {n: layer.lora_B[n].get_value().astype(jnp.float32) for n, _ in valid}
    a_shape = a_of[valid[0][0]].shape[:-1]
    if combination_type == "cat":
        a = jnp.concatenate([a_of[n] * (w * specs[n].scaling) for n, w in valid], axis=-1)
        b = jnp.concatenate([b_of[n] for n, _ in valid], axis=0)
        pad = new_rank - a.shape[-1]
        return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]), jnp.pad(b, [(0, pad), (0, 0)])
    if combination_type in SAME_RANK:
        signed = [math.copysign(math.sqrt(abs(w * specs[n].scaling)), w * specs[n].scaling) for n, w in valid]
        plain = [math.sqrt(abs(w * specs[n].scaling)) for n, w in valid]
        key_a, key_b = jax.random.split(key)
        opts = dict(density=density, majority_sign_method=majority_sign_method)
        a = combine(combination_type, [a_of[n] for n, _ in valid], signed, key=key_a, **opts)
        b = combine(combination_type, [b_of[n] for n, _ in valid], plain, key=key_b, **opts)
        return a, b
    # svd rules: combine the scaled deltas in PEFT's [out, in] orientation, then factor them
    deltas = [specs[n].scaling * (a_of[n].reshape(-1, a_of[n].shape[-1]) @ b_of[n]).T for n, _ in valid]
    rule = combination_type.removesuffix("_svd")
    delta = combine(rule, deltas, [w for _, w in valid], density=density,
                    majority_sign_method=majority_sign_method, key=key)
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    u, vh = u[:, :new_rank] * s[None, :new_rank], vh[:new_rank]
    if svd_clamp is not None:
        hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), svd_clamp)
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    rank = u.shape[1]  # a delta smaller than new_rank gives fewer components; the rest stay zero
    a = jnp.zeros((vh.shape[1], new_rank)).at[:, :rank].set(vh.T)
    b = jnp.zeros((new_rank, u.shape[0])).at[:rank].set(u.T)
    return a.reshape(a_shape + (new_rank,)), b
