"""Attention building blocks shared by the bundled models: masks, softmax attention, KV cache.

The KV cache protocol: a cache is a list with one ``{"k", "v"}`` dict per layer, each of shape
``[batch, max_len, kv_heads, head_dim]``. A model called with ``cache`` and ``cache_index`` writes
the new keys and values at ``cache_index`` and attends over all ``max_len`` slots; its
``attention_mask`` then covers all slots (1 where a slot holds a real token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask_4d(
    query_slots: jax.Array,
    key_mask: jax.Array,
    *,
    causal: bool,
    window: int | None = None,
) -> jax.Array:
    """Builds a boolean ``[batch, 1, q, k]`` mask.

    Args:
      query_slots: ``[q]`` or ``[batch, q]`` indices of each query in the key sequence.
      key_mask: ``[batch, k]``, true where a key is a real token.
      causal: a query sees only keys at or before its own slot.
      window: sliding window size; a query sees keys with ``q - k < window``.
    """
    key_mask = key_mask.astype(bool)
    if query_slots.ndim == 1:
        query_slots = query_slots[None, :]
    k = jnp.arange(key_mask.shape[-1])[None, None, :]
    q = query_slots[:, :, None]
    mask = key_mask[:, None, :]
    if causal:
        mask = mask & (k <= q)
    if window is not None:
        mask = mask & (k > q - window)
    return mask[:, None, :, :]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float
) -> jax.Array:
    """Softmax attention with grouped-query heads; the softmax runs in float32.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads``.
      mask: boolean ``[batch, 1, q_len, k_len]`` (see ``attention_mask_4d``).
    """
    b, sq, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, sq, kvh, h // kvh, d)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k).astype(jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(b, sq, h, d)


def init_kv_cache(
    num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype
) -> list[dict[str, jax.Array]]:
    """An empty cache for ``num_layers`` layers."""
    shape = (batch, max_len, kv_heads, head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(num_layers)]


def update_kv_cache(
    layer_cache: dict[str, jax.Array], k: jax.Array, v: jax.Array, index: jax.Array
) -> dict[str, jax.Array]:
    """Writes ``k``/``v`` (``[batch, new, kv_heads, head_dim]``) at slot ``index``."""
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, jnp.asarray(index, jnp.int32), zero, zero)
    return {
        "k": jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), idx),
        "v": jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), idx),
    }
