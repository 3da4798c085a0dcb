"""Mamba-2's selective state space scan (state space duality, SSD), by chunks.

A port of the math of transformers' PyTorch fallback (``mamba2_chunk_scan`` and
``mamba2_selective_state_update`` in ``modeling_bamba``), in float32 as it computes. Per head, a
``[head_dim, state_size]`` state ``h`` decays by ``exp(dt_t A)`` and takes in ``dt_t x_t B_t``; the
output reads it with ``C_t``::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;    y_t = h_t C_t

Within a chunk that is one masked matrix product (the "attention" form: scores ``C_i . B_j`` times
the decay between ``j`` and ``i``); across chunks the state is carried by ``lax.scan``. One decoded
token is a chunk of one: the recurrence itself. Packed rows (``segment_ids``): each sequence starts
from a zero state, as it would alone (the decay between two tokens of different sequences is zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ssd_scan(x, dt, A, B, C, chunk_size: int, initial_state=None, segment_ids=None):
    """The selective scan over a sequence (the ``D`` skip connection not included).

    Args:
      x: ``[batch, seq, heads, head_dim]``.
      dt: ``[batch, seq, heads]``, the time steps (after ``dt_bias``, softplus and any clamp).
      A: ``[heads]``, negative.
      B, C: ``[batch, seq, groups, state_size]`` (``heads`` a multiple of ``groups``: each group
        serves that many consecutive heads).
      chunk_size: the tokens solved at once (a sequence shorter than it is one chunk).
      initial_state: ``[batch, heads, head_dim, state_size]``; ``None``: zeros.
      segment_ids: ``[batch, seq]`` packed rows, one id per sequence (runs of equal ids): each
        sequence from a zero state (``initial_state`` reaches the first one only).

    Returns:
      ``(y [batch, seq, heads, head_dim]`` float32, the final state float32).
    """
    b, s, h, p = x.shape
    n = B.shape[-1]
    rep = h // B.shape[2]
    x, dt, B, C = (t.astype(jnp.float32) for t in (x, dt, B, C))
    if rep != 1:
        B, C = jnp.repeat(B, rep, axis=2), jnp.repeat(C, rep, axis=2)
    x = x * dt[..., None]
    a = dt * A.astype(jnp.float32)[None, None, :]  # the log decay of each step
    size = min(chunk_size, s)
    pad = (size - s % size) % size
    if pad:  # padded steps take in nothing (x, B 0) and decay nothing (a 0)
        x, B, C = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (x, B, C))
        a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
    m = (s + pad) // size

    def chunks(t):  # [b, s', h, ...] -> [b, h, m, size, ...]
        t = jnp.moveaxis(t, 2, 1)
        return t.reshape(b, h, m, size, *t.shape[3:])

    x, a, B, C = chunks(x), chunks(a), chunks(B), chunks(C)
    # which pairs of a chunk's positions share a sequence, which positions the carried state
    # reaches (those of the sequence the previous chunk ended in), which feed the next state
    same, carry, ends = 1.0, 1.0, 1.0
    if segment_ids is not None:
        seg = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, pad)), mode="edge")
        before = jnp.concatenate([seg[:, :1], seg[:, size - 1:-1:size]], axis=1)  # [b, m]
        seg = seg.reshape(b, 1, m, size)
        same = seg[..., :, None] == seg[..., None, :]
        carry = seg == before[:, None, :, None]
        ends = seg == seg[..., -1:]
    cum = jnp.cumsum(a, axis=-1)  # log decay from the chunk's start to each position
    lower = jnp.tril(jnp.ones((size, size), bool))
    # decay from position j to i >= j within a chunk; masked before exp so it never overflows
    pair = jnp.exp(jnp.where(lower[None, None, None], cum[..., :, None] - cum[..., None, :], -jnp.inf)) * same
    y_diag = ((C @ jnp.swapaxes(B, -1, -2)) * pair) @ x  # [b, h, m, size, p]
    reached = jnp.exp(cum) * carry  # the carried state's decay at each position, 0 past a boundary
    to_end = jnp.exp(cum[..., -1:] - cum) * ends
    chunk_states = jnp.swapaxes(x, -1, -2) @ (B * to_end[..., None])  # [b, h, m, p, n]
    chunk_decay = reached[..., -1][..., None, None]

    def step(state, xs):
        c_i, reached_i, new_i, decay_i = xs
        out = (c_i @ jnp.swapaxes(state, -1, -2)) * reached_i[..., None]
        return state * decay_i + new_i, out

    state = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    xs = tuple(jnp.moveaxis(t, 2, 0) for t in (C, reached, chunk_states, chunk_decay))
    state, y_off = jax.lax.scan(step, state, xs)  # y_off: [m, b, h, size, p]
    y = (y_diag + jnp.moveaxis(y_off, 0, 2)).reshape(b, h, m * size, p)[:, :, :s]
    return jnp.swapaxes(y, 1, 2), state
