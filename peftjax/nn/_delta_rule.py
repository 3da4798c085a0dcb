"""The gated delta rule (Gated DeltaNet's linear attention) and its causal depthwise convolution.

Ports of transformers' PyTorch fallbacks (``torch_chunk_gated_delta_rule``,
``torch_recurrent_gated_delta_rule`` and ``causal_conv1d_*`` in ``modeling_qwen3_5``), in float32
as they compute. Per value head, a ``[key_dim, value_dim]`` state ``S`` decays by ``exp(g_t)``, is
read by the key (``k_t S``), corrected toward ``v_t`` at rate ``beta_t`` and read by the query::

    S <- exp(g_t) S;  S <- S + k_t^T (beta_t (v_t - k_t S));  o_t = q_t S

with ``q`` and ``k`` L2-normalised and ``q`` scaled by ``key_dim ** -0.5``. The chunked form
(training, prefill) solves each chunk's updates at once (a unit lower-triangular system) and
carries ``S`` from chunk to chunk with ``lax.scan``; the recurrent form (one-token decoding) steps
token by token. Both give the same values up to float32 rounding. Packed rows (``segment_ids``):
each sequence starts from a zero state and a zero convolution history, as it would alone: what
one token passes another (the decay between them, the carried state, the convolution's taps) is
zero across a sequence's boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK_SIZE = 64  # transformers' chunk_size (the model never sets another)


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``x / sqrt(sum(x**2) + eps)`` over the last axis (FLA's and transformers' form)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _heads_first(q, k, v, g, beta):
    """Queries and keys repeated over the value heads they serve, everything float32 and
    ``[batch, heads, seq, ...]``; ``q`` and ``k`` normalised, ``q`` scaled."""
    rep = v.shape[2] // k.shape[2]
    if rep != 1:  # each query/key head serves `rep` consecutive value heads
        q, k = jnp.repeat(q, rep, axis=2), jnp.repeat(k, rep, axis=2)
    q, k, v, g, beta = (jnp.swapaxes(t.astype(jnp.float32), 1, 2) for t in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, chunk_size: int = CHUNK_SIZE, segment_ids=None):
    """The gated delta rule over a sequence, by chunks.

    Args:
      q, k: ``[batch, seq, key_heads, key_dim]``.
      v: ``[batch, seq, value_heads, value_dim]`` (``value_heads`` a multiple of ``key_heads``).
      g: ``[batch, seq, value_heads]`` log decay (<= 0).
      beta: ``[batch, seq, value_heads]`` write strength.
      initial_state: ``[batch, value_heads, key_dim, value_dim]``; ``None``: zeros.
      segment_ids: ``[batch, seq]`` packed rows, one id per sequence (runs of equal ids): each
        sequence from a zero state (``initial_state`` reaches the first one only).

    Returns:
      ``(out [batch, seq, value_heads, value_dim]`` in ``q``'s dtype, the final state in float32).
    """
    dtype = q.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    b, h, s, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk_size - s % chunk_size) % chunk_size
    if pad:  # padded steps write nothing (beta 0) and decay nothing (g 0)
        q, k, v = (jnp.pad(t, ((0, 0), (0, 0), (0, pad), (0, 0))) for t in (q, k, v))
        g, beta = (jnp.pad(t, ((0, 0), (0, 0), (0, pad))) for t in (g, beta))
    n = (s + pad) // chunk_size
    # which pairs of a chunk's positions share a sequence, which positions the carried state
    # reaches (those of the sequence the previous chunk ended in), which write the next state
    same, carry, ends = 1.0, 1.0, 1.0
    if segment_ids is not None:
        seg = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, pad)), mode="edge")
        before = jnp.concatenate([seg[:, :1], seg[:, chunk_size - 1:-1:chunk_size]], axis=1)  # [b, n]
        seg = seg.reshape(b, 1, n, chunk_size)
        same = seg[..., :, None] == seg[..., None, :]
        carry = seg == before[:, None, :, None]
        ends = seg == seg[..., -1:]

    def chunks(t):
        return t.reshape(b, h, n, chunk_size, *t.shape[3:])

    v_beta, k_beta = chunks(v * beta[..., None]), chunks(k * beta[..., None])
    q, k, g = chunks(q), chunks(k), chunks(g)
    cum = jnp.cumsum(g, axis=-1)  # log decay from the chunk's start to each position
    upper = jnp.triu(jnp.ones((chunk_size, chunk_size), bool), 1)
    # decay between positions j <= i of a chunk; masked before exp so it never overflows
    pair = jnp.exp(jnp.where(upper[None, None, None], -jnp.inf, cum[..., :, None] - cum[..., None, :])) * same
    system = (k_beta @ jnp.swapaxes(k, -1, -2)) * pair
    intra = (q @ jnp.swapaxes(k, -1, -2)) * pair
    # the chunk's delta-rule updates at once: (I + strictly lower part of `system`)^-1 applied
    solve = lambda rhs: jax.lax.linalg.triangular_solve(  # noqa: E731
        system, rhs, left_side=True, lower=True, unit_diagonal=True)
    new_values = solve(v_beta)
    reached = jnp.exp(cum) * carry  # the carried state's decay at each position, 0 past a boundary
    k_cumdecay = solve(k_beta * reached[..., None])
    q = q * reached[..., None]
    k = k * (jnp.exp(cum[..., -1:] - cum) * ends)[..., None]
    chunk_decay = reached[..., -1][..., None, None]

    def step(state, xs):
        q_i, k_i, intra_i, nv_i, kcd_i, decay_i = xs
        v_new = nv_i - kcd_i @ state
        out = q_i @ state + intra_i @ v_new
        return state * decay_i + jnp.swapaxes(k_i, -1, -2) @ v_new, out

    state = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))
    xs = tuple(jnp.moveaxis(t, 2, 0) for t in (q, k, intra, new_values, k_cumdecay, chunk_decay))
    state, out = jax.lax.scan(step, state, xs)  # out: [n, b, h, chunk, dv]
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, n * chunk_size, dv)[:, :, :s]
    return jnp.swapaxes(out, 1, 2).astype(dtype), state


def recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """The gated delta rule token by token (decoding); arguments and result as
    :func:`chunk_gated_delta_rule`'s."""
    dtype = q.dtype
    q, k, v, g, beta = _heads_first(q, k, v, g, beta)
    b, h, _, dk = k.shape
    state = (jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32) if initial_state is None
             else initial_state.astype(jnp.float32))

    def step(state, xs):
        q_t, k_t, v_t, g_t, beta_t = xs
        state = state * jnp.exp(g_t)[..., None, None]
        kv_mem = jnp.sum(state * k_t[..., None], axis=-2)
        delta = (v_t - kv_mem) * beta_t[..., None]
        state = state + k_t[..., None] * delta[..., None, :]
        return state, jnp.sum(state * q_t[..., None], axis=-2)

    state, out = jax.lax.scan(step, state, tuple(jnp.moveaxis(t, 2, 0) for t in (q, k, v, g, beta)))
    return jnp.moveaxis(out, 0, 1).astype(dtype), state  # [s, b, h, dv] -> [b, s, h, dv]


def causal_depthwise_conv(x: jax.Array, weight: jax.Array, state: jax.Array | None = None, segment_ids=None):
    """A causal depthwise 1-D convolution over the sequence, as torch's ``Conv1d(groups=channels,
    padding=kernel - 1)`` cut to the input's length.

    Args:
      x: ``[batch, seq, channels]``.
      weight: ``[channels, 1, kernel]`` (torch's layout).
      state: ``[batch, kernel - 1, channels]``, the inputs before ``x`` (a decoding cache's);
        ``None``: zeros.
      segment_ids: ``[batch, seq]`` packed rows: a tap reads zero across a sequence's start (and
        reads no ``state``).

    Returns:
      ``(out [batch, seq, channels]``, the last ``kernel - 1`` inputs: the next call's ``state``).
    """
    kernel = weight.shape[-1]
    if state is None:
        state = jnp.zeros((x.shape[0], kernel - 1, x.shape[-1]), x.dtype)
    full = jnp.concatenate([state.astype(x.dtype), x], axis=1)
    s = x.shape[1]
    w = weight[:, 0, :].astype(x.dtype)  # [channels, kernel]
    if segment_ids is None:
        out = sum(full[:, j:j + s, :] * w[None, None, :, j] for j in range(kernel))
    else:
        seg = jnp.asarray(segment_ids, jnp.int32)
        seg_full = jnp.concatenate([jnp.full((seg.shape[0], kernel - 1), -1, jnp.int32), seg], axis=1)
        out = sum(jnp.where((seg_full[:, j:j + s] == seg)[..., None], full[:, j:j + s, :], 0) * w[None, None, :, j]
                  for j in range(kernel))
    return out, full[:, s:, :]
