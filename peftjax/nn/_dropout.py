"""Dropout on the adapter branch, driven by an explicit key.

Adapter layers sit deep inside a user's model, whose call signature peftjax does not control, so
the key reaches them through a context manager that is active while the forward is traced:

    with peftjax.dropout_key(key):
        loss = loss_fn(model, batch)

Each layer folds in a hash of its own path, so layers draw independent masks. Without an active
key (evaluation), dropout is the identity, like PyTorch's ``eval()``.
"""

from __future__ import annotations

import contextlib
import threading
import zlib

import jax
import jax.numpy as jnp

_state = threading.local()


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    """Enables adapter dropout with ``key`` inside the block (``None`` disables it)."""
    previous = getattr(_state, "key", None)
    _state.key = key
    try:
        yield
    finally:
        _state.key = previous


def apply_dropout(x: jax.Array, rate: float, path: str) -> jax.Array:
    """Inverted dropout of ``x`` with the active key folded with ``path``; identity without a key."""
    key = getattr(_state, "key", None)
    if key is None or rate <= 0.0:
        return x
    key = jax.random.fold_in(key, zlib.crc32(path.encode()))
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def active_dropout_key() -> jax.Array | None:
    """The key set by the innermost :func:`dropout_key` block (``None`` outside one)."""
    return getattr(_state, "key", None)


def layer_key(key: jax.Array | None, index) -> jax.Array | None:
    """Layer ``index``'s key from a stack's ``key`` (``None`` without one): the same whether the
    layers loop or scan, so a stacked and an unstacked model draw the same dropout masks."""
    return None if key is None else jax.random.fold_in(key, index)
