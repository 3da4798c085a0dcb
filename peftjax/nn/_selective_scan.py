"""Mamba's selective scan (Mamba-1: a state per channel and state dimension), by chunks.

The math of transformers' PyTorch fallback (``mamba_selective_scan`` and
``mamba_selective_state_update`` in ``modeling_mamba``), in float32. Per channel ``d`` a state
``h [state_size]`` decays by ``exp(dt_t A_d)`` (``A_d`` one rate per state dimension) and takes in
``dt_t x_t B_t``; the output reads it with ``C_t``::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t;    y_t = h_t . C_t

The decay differs per channel and state dimension, so no chunk-wide matrix product exists as in
Mamba-2 (``_ssd``). Each chunk's states come from an associative scan over its steps
(``jax.lax.associative_scan``), the state passes from chunk to chunk through ``lax.scan``, and each
chunk is rematerialised in the backward pass: memory holds one chunk's ``[batch, chunk, channels,
state_size]`` at a time, not the sequence's. Packed rows (``segment_ids``): a sequence's first step
does not decay the state it is given but drops it (its decay is 0), so each starts from zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK_SIZE = 64


def selective_scan(x, dt, A, B, C, initial_state=None, segment_ids=None, chunk_size: int = CHUNK_SIZE):
    """The selective scan over a sequence (``D`` and the gate not included).

    Args:
      x, dt: ``[batch, seq, channels]`` (``dt`` after its bias and softplus).
      A: ``[channels, state_size]``, negative.
      B, C: ``[batch, seq, state_size]``.
      initial_state: ``[batch, channels, state_size]``; ``None``: zeros.
      segment_ids: ``[batch, seq]`` packed rows (runs of equal ids): each from a zero state.
      chunk_size: the steps scanned at once.

    Returns:
      ``(y [batch, seq, channels]`` float32, the final state float32).
    """
    b, s, d = x.shape
    n = A.shape[-1]
    x, dt, B, C = (t.astype(jnp.float32) for t in (x, dt, B, C))
    keep = jnp.ones((b, s), jnp.float32)  # 0 where a packed sequence starts: the carried state dropped
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids, jnp.int32)
        keep = jnp.concatenate([jnp.ones((b, 1), jnp.float32), (seg[:, 1:] == seg[:, :-1]).astype(jnp.float32)],
                               axis=1)
    size = min(chunk_size, s)
    pad = (size - s % size) % size
    if pad:  # padded steps take in nothing (dt 0) and keep the state (decay exp(0) = 1)
        x, dt, B, C = (jnp.pad(t, ((0, 0), (0, pad), (0, 0))) for t in (x, dt, B, C))
        keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1.0)
    m = (s + pad) // size
    chunks = lambda t: jnp.moveaxis(t.reshape(b, m, size, *t.shape[2:]), 1, 0)  # noqa: E731
    A = A.astype(jnp.float32)

    @jax.checkpoint
    def step(state, xs):
        x_c, dt_c, b_c, c_c, keep_c = xs  # [b, size, ...]
        decay = jnp.exp(dt_c[..., None] * A[None, None]) * keep_c[..., None, None]  # [b, size, d, n]
        inflow = (dt_c * x_c)[..., None] * b_c[:, :, None, :]

        def combine(left, right):
            return left[0] * right[0], right[0] * left[1] + right[1]

        decays, states = jax.lax.associative_scan(combine, (decay, inflow), axis=1)
        states = states + decays * state[:, None]  # the carried state, decayed to each step
        return states[:, -1], jnp.einsum("bldn,bln->bld", states, c_c)

    state = jnp.zeros((b, d, n), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    state, y = jax.lax.scan(step, state, tuple(chunks(t) for t in (x, dt, B, C, keep)))
    return jnp.moveaxis(y, 0, 1).reshape(b, m * size, d)[:, :s], state
