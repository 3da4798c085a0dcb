"""The bundled models' own dropout: it runs only when a call is given a key (training).

A model's state is nothing but its parameters: ``model(..., dropout_rng=key)`` applies the
dropout transformers applies in ``.train()`` mode, ``model(...)`` is ``.eval()``. The train step
and the Trainer pass a key derived from the step's key (``peftjax.training``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp



def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout as ``torch.nn.Dropout`` applies it in training; the identity without a key."""
    if key is None or rate == 0.0:
        return x
    if rate >= 1.0:  # torch returns zeros; x / 0 would poison the gradient
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` keys from ``key``, or ``n`` times ``None`` without one."""
    return [None] * n if key is None else list(jax.random.split(key, n))

