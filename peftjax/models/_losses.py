"""Losses computed the way transformers computes them for each head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross entropy; label ``-100`` is ignored (labels are not pre-shifted)."""
    logits = logits[:, :-1].astype(jnp.float32)
    labels = labels[:, 1:]
    return masked_cross_entropy(logits, labels)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross entropy over the positions whose label is not ``-100``."""
    valid = labels != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(valid, labels, 0)
    )
    return jnp.sum(per_token * valid) / jnp.maximum(jnp.sum(valid), 1)


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, config) -> jax.Array:
    """Regression, single-label or multi-label loss, chosen as transformers chooses it."""
    logits = logits.astype(jnp.float32)
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return jnp.mean((jnp.squeeze(logits) - jnp.squeeze(labels).astype(jnp.float32)) ** 2)
    if problem == "single_label_classification":
        return masked_cross_entropy(logits, labels.reshape(-1))
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))
