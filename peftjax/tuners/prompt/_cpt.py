"""Context-aware prompt tuning (CPT), computed as PEFT 0.22 computes it.

The virtual tokens are an in-context template's embeddings plus a trained delta, ``embedding +
delta``. Three things set CPT apart from prompt tuning, each reproduced here:

- the delta of each token stays in a ball around zero, of radius ``epsilon * sqrt(token_dim /
  2048)`` by the token's type (:func:`token_radii`). PEFT rescales the stored delta into the ball
  before every forward and trains the rescaled value; a peftjax train step projects the delta
  right after each update instead (:class:`EpsilonBall`, a ``ProjectedAdapterParam``), which
  gives the same values at every forward and the same optimizer inputs;
- only the template's input and format tokens train: the answers' rows get no gradient;
- the loss scores the answers inside the template as well as the batch's own, optionally with
  each example's answer weighted ``decay`` times the next one's (:func:`cpt_loss`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.models._losses import IGNORE_INDEX

# PEFT's radius for the tokens that do not train (an answer's, type 0's)
_MIN_RADIUS = 1e-10


def token_radii(type_mask, token_dim: int, input_epsilon: float, format_epsilon: float) -> tuple[float, ...]:
    """Each template token's radius, in float32 as PEFT's ``get_epsilon``: the format epsilon for
    types ``4k + 1`` and ``4k + 3``, the input epsilon for ``4k + 2``, both times ``sqrt(token_dim /
    2048)``; ``1e-10`` for the others."""
    scale = np.sqrt(np.float32(token_dim / 2048))
    kinds = np.asarray(type_mask) % 4
    radii = np.full(len(kinds), _MIN_RADIUS, np.float32)
    radii[(np.asarray(type_mask) > 0) & ((kinds == 1) | (kinds == 3))] = np.float32(format_epsilon) * scale
    radii[(np.asarray(type_mask) > 0) & (kinds == 2)] = np.float32(input_epsilon) * scale
    return tuple(float(r) for r in radii)


def trained_rows(type_mask) -> tuple[bool, ...]:
    """Which template tokens train: types ``4k + 1``, ``4k + 2`` and ``4k + 3`` (PEFT's gradient hook)."""
    return tuple(bool(t % 4 in (1, 2, 3)) for t in type_mask)


@dataclasses.dataclass(frozen=True)
class EpsilonBall:
    """Rescales each row of a ``[tokens, dim]`` delta whose norm exceeds its radius onto the
    sphere of that radius (PEFT's ``get_projection``); rows inside, and zero rows, are kept."""

    radii: tuple[float, ...]

    def __call__(self, delta: jax.Array) -> jax.Array:
        radii = jnp.asarray(self.radii, jnp.float32).astype(delta.dtype)
        norm = jnp.linalg.norm(delta, axis=-1)
        scale = jnp.where(norm > 0, radii / jnp.maximum(norm, radii), 1.0)
        return delta * scale[:, None]


def used_delta(delta: jax.Array, ball: EpsilonBall, trained: tuple[bool, ...]) -> jax.Array:
    """The delta a forward adds: projected into the ball, the gradient passed straight through to
    the rows that train (PEFT trains the projected value, and masks the others' gradient)."""
    rows = jnp.asarray(trained)[:, None]
    delta = jnp.where(rows, delta, jax.lax.stop_gradient(delta))
    return delta + jax.lax.stop_gradient(ball(delta) - delta)


def cpt_labels(labels, input_type_mask, token_ids, type_mask, weighting: str, decay: float):
    """The labels and per-position loss weights of a batch with the template before it, as PEFT's
    ``_cpt_forward`` and ``calculate_loss`` make them.

    The labels are the template's token ids followed by the batch's, ``-100`` wherever the type
    (the template's, then ``input_type_mask`` shifted up by the template's largest type rounded up
    to a multiple of 4 where it is positive; all 4 when it is not given) is not a positive multiple
    of 4: the batch's groups of four start after the template's (PEFT 0.22; 0.21.2 shifted by the
    largest type itself, which could make the batch's answers something else). With
    ``weighting="decay"``, a position of answer type ``t`` weighs ``decay ** n``, ``n`` the number
    of larger answer types among its row's scored positions; otherwise 1.

    Returns:
      ``(labels, weights)``, both ``[batch, V + seq]``.
    """
    labels = jnp.asarray(labels)
    b = labels.shape[0]
    if input_type_mask is None:
        input_type_mask = jnp.full(labels.shape, 4, jnp.int32)
    types = jnp.asarray(input_type_mask).astype(jnp.int32)
    types = jnp.where(types > 0, types + -(-max(type_mask) // 4) * 4, types)
    types = jnp.concatenate([jnp.broadcast_to(jnp.asarray(type_mask, jnp.int32), (b, len(type_mask))), types], 1)
    full = jnp.concatenate([jnp.broadcast_to(jnp.asarray(token_ids, labels.dtype), (b, len(token_ids))), labels], 1)
    answer = (types > 0) & (types % 4 == 0)
    full = jnp.where(answer, full, IGNORE_INDEX)
    if weighting != "decay":
        return full, jnp.ones(full.shape, jnp.float32)
    # counted over the positions the loss scores, the first one's type left out (PEFT's shifted mask)
    larger = jax.vmap(_larger_kinds)(jnp.where(answer, types, -1)[:, 1:])
    return full, jnp.pad(jnp.asarray(decay, jnp.float32) ** larger, ((0, 0), (1, 0)), constant_values=1.0)


def _larger_kinds(types: jax.Array) -> jax.Array:
    """For each position of a row, how many distinct non-negative values of ``types`` exceed its own."""
    order = jnp.argsort(-types)
    ranked = types[order]
    new = jnp.concatenate([jnp.ones((1,), bool), ranked[1:] != ranked[:-1]])
    return jnp.zeros(types.shape, jnp.int32).at[order].set(jnp.cumsum(new) - 1).astype(jnp.float32)


def cpt_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """PEFT's CPT loss: next-token cross entropy times the weights, averaged over the positions
    whose label is not ``-100`` (0 where there are none)."""
    logits, labels, weights = logits[:, :-1].astype(jnp.float32), labels[:, 1:], weights[:, 1:]
    valid = labels != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(per_token * weights * valid) / jnp.maximum(jnp.sum(valid), 1)
