"""The bundled models' own dropout: it runs only when a call is given a key (training).

A model's state is nothing but its parameters: ``model(..., dropout_rng=key)`` applies the
dropout transformers applies in ``.train()`` mode, ``model(...)`` is ``.eval()``. The train step
and the Trainer pass a key derived from the step's key (``peftjax.training``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.nn._dropout import keep_mask


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout as ``torch.nn.Dropout`` applies it in training; the identity without a key."""
    if key is None or rate == 0.0:
        return x
    if rate >= 1.0:  # torch returns zeros; x / 0 would poison the gradient
        return jnp.zeros_like(x)
    keep = keep_mask(key, x.shape, 1.0 - rate)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def token_classifier_dropout(config) -> float:
    """The dropout before a decoder's token classifier, by transformers' rule for GPT-2's and the
    ``GenericForTokenClassification`` ones: ``classifier_dropout``, else ``hidden_dropout``, else 0.1."""
    rates = (getattr(config, "classifier_dropout", None), getattr(config, "hidden_dropout", None))
    return float(next((r for r in rates if r is not None), 0.1))
