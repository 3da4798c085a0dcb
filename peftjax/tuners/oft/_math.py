"""The orthogonal-matrix math OFT and BOFT share, as pure functions (PEFT 0.22.0's formulas).

- :func:`skew_from_vector`: PEFT's ``oft_R`` row (the strict upper triangle, row-major) to the
  skew-symmetric block ``Q = U - U^T``.
- :func:`cayley_neumann`: PEFT's truncated series ``I + 2Q + 2Q^2 + ... + 2Q^(k-2) + Q^(k-1)``.
- :func:`cayley_exact`: ``(I - Q)(I + Q)^-1``, what ``torch.linalg.solve(I + Q, I - Q, left=False)``
  computes.
- :func:`coft_project`: constrained OFT's projection of ``Q`` onto a Frobenius ball.
- :func:`identity_blocks`: multiplicative dropout, ``num`` random blocks replaced by ``I``.
- :func:`rotate_blocks`: ``x @ block_diag(R_0, ..., R_{k-1})`` without building the matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def skew_from_vector(vec: jax.Array, block_size: int) -> jax.Array:
    """``[k, b (b - 1) / 2] -> [k, b, b]``: the upper triangle from ``vec``, minus its transpose."""
    rows, cols = np.triu_indices(block_size, 1)  # torch.triu_indices(b, b, 1)'s order
    upper = jnp.zeros((vec.shape[0], block_size, block_size), vec.dtype).at[:, rows, cols].set(vec)
    return upper - jnp.swapaxes(upper, -1, -2)


def vector_from_skew(mat: jax.Array) -> jax.Array:
    rows, cols = np.triu_indices(mat.shape[-1], 1)
    return mat[:, rows, cols]


@functools.partial(jax.jit, static_argnums=1)
def cayley_neumann(q: jax.Array, num_terms: int) -> jax.Array:
    """PEFT's Cayley-Neumann series of skew blocks ``q`` ``[k, b, b]`` with ``num_terms`` terms."""
    out = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
    if num_terms > 1:
        out = out + 2.0 * q
    if num_terms > 2:
        power = q @ q
        out = out + 2.0 * power
        for _ in range(3, num_terms - 1):
            power = power @ q
            out = out + 2.0 * power
        out = out + power @ q
    return out


@jax.jit  # one executable, also when called eagerly (the solve is many primitives)
def cayley_exact(q: jax.Array) -> jax.Array:
    """``X`` with ``X (I + q) = I - q`` for each block, i.e. ``(I - q)(I + q)^-1``."""
    eye = jnp.broadcast_to(jnp.eye(q.shape[-1], dtype=q.dtype), q.shape)
    # X A = B  <=>  A^T X^T = B^T
    xt = jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2), jnp.swapaxes(eye - q, -1, -2))
    return jnp.swapaxes(xt, -1, -2)


@functools.partial(jax.jit, static_argnums=(1, 2))
def coft_project(vec: jax.Array, block_size: int, eps: float) -> jax.Array:
    """PEFT's ``_project_batch``: each block's skew matrix scaled onto radius ``eps / sqrt(k)``
    when its Frobenius norm is larger, returned as the upper-triangle vector again."""
    q = skew_from_vector(vec, block_size)
    radius = eps / jnp.sqrt(jnp.asarray(q.shape[0], q.dtype))
    norm = jnp.linalg.norm(q, axis=(1, 2), keepdims=True)
    safe = jnp.where(norm > 0, norm, 1.0)
    return vector_from_skew(jnp.where(norm <= radius, q, radius * (q / safe)))


def identity_blocks(blocks: jax.Array, num: int, key: jax.Array) -> jax.Array:
    """``blocks`` ``[d, h, h]`` with ``num`` of them, chosen uniformly at random, set to ``I``."""
    d, h = blocks.shape[0], blocks.shape[-1]
    chosen = (jax.random.permutation(key, d) < num).astype(blocks.dtype)[:, None, None]
    return (1 - chosen) * blocks + chosen * jnp.eye(h, dtype=blocks.dtype)[None]


def rotate_blocks(x: jax.Array, blocks: jax.Array) -> jax.Array:
    """``x @ block_diag(*blocks)`` for ``x`` ``[..., k b]`` and ``blocks`` ``[k, b, b]``."""
    k, b = blocks.shape[0], blocks.shape[-1]
    parts = x.reshape(*x.shape[:-1], k, b)
    return jnp.einsum("...rk,rkc->...rc", parts, blocks).reshape(x.shape)
