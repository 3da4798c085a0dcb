"""Attention building blocks shared by the bundled models: masks, softmax attention, KV cache.

The KV cache protocol: a cache is a list with one ``{"k", "v"}`` dict per layer, each of shape
``[batch, max_len, kv_heads, head_dim]``. A model called with ``cache`` and ``cache_index`` writes
the new keys and values at ``cache_index`` and attends over all ``max_len`` slots; its
``attention_mask`` then covers all slots (1 where a slot holds a real token).

The prefix attention protocol (what prefix tuning needs from a model): a model whose ``__call__``
takes ``prefix_kv`` accepts one ``(key, value)`` pair per layer, each ``[batch or 1, V, kv_heads,
head_dim]``, and behaves as transformers' model given a cache that already holds those ``V``
entries (PEFT's ``past_key_values``):

- each layer's keys and values are ``concat(prefix, own)`` along the sequence, the prefix keys
  used as they are (no RoPE: they are cached keys, not tokens);
- every query sees all ``V`` prefix entries; ``attention_mask`` covers only the model's own keys
  (the tokens, or the cache slots), never the prefix;
- the prefix occupies positions before the tokens, so the default ``position_ids`` start at
  ``V`` (``V + cache_index`` with a cache), as transformers' do after a cache of length ``V``;
  explicit ``position_ids`` are used as given (PEFT adds ``V`` to them itself);
- with a KV cache, the prefix is passed at every step and prepended to the cache's slots.

Llama (and the families built on it, Gemma included), GPT-2 and BERT implement it; peftjax refuses prefix tuning (``TypeError``) on a model
whose ``__call__`` has no ``prefix_kv`` parameter. :func:`check_prefix_kv` validates the pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models._dropout import dropout
from peftjax.nn._functional import softmax


def dropped_attention(q, k, v, mask, *, scale: float | None = None, bias=None, rate: float = 0.0, rng=None):
    """``[batch, q, heads, head_dim]``: softmax attention of ``q`` over ``k``/``v`` (``[batch, len,
    heads, head_dim]``), the scores in float32 times ``scale`` plus ``bias`` (each where given) and
    ``mask``ed, the probabilities dropped at ``rate`` with ``rng`` as torch's ``.train()`` drops
    them (the encoders' and encoder-decoders' attention: BERT's, T5's, BART's, MPNet's)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if scale is not None:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = dropout(softmax(scores, axis=-1).astype(v.dtype), rate, rng)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


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


def chunked_attention_mask_4d(query_slots: jax.Array, key_mask: jax.Array, chunk: int,
                              segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal attention within chunks of ``chunk`` slots (Llama 4's local layers): a boolean
    ``[batch, 1, q, k]`` mask, as transformers' ``create_chunked_causal_mask``: the chunks of each
    row start at its first real key (left padding shifts them); in packed rows, within each
    sequence, its chunks counted from its first token.

    Args:
      query_slots: ``[q]`` or ``[batch, q]`` indices of each query in the key sequence.
      key_mask: ``[batch, k]``, true where a key is a real token.
      chunk: the chunk size (``attention_chunk_size``).
      segment_ids: ``[batch, seq]`` packed rows (the queries are the keys), or ``None``.
    """
    mask = within_segments(attention_mask_4d(query_slots, key_mask, causal=True), segment_ids)
    if segment_ids is not None:
        q = k = segment_positions(segment_ids)
    else:
        lead = jnp.sum(jnp.cumsum(key_mask.astype(jnp.int32), axis=-1) == 0, axis=-1)[:, None]  # [b, 1]
        q = (query_slots[None, :] if query_slots.ndim == 1 else query_slots) - lead
        k = jnp.arange(key_mask.shape[-1])[None, :] - lead
    return mask & ((q[:, :, None] // chunk) == (k[:, None, :] // chunk))[:, None]


def segment_mask(segment_ids: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """The boolean ``[batch, 1, seq, seq]`` mask of packed rows: a token sees the keys of its own
    segment only. ``segment_ids``: ``[batch, seq]``, a positive id per packed sequence, 0 on
    padding (which no query sees); ``key_mask`` (``[batch, seq]``) removes further keys."""
    segment_ids = jnp.asarray(segment_ids)
    valid = segment_ids > 0
    if key_mask is not None:
        valid = valid & jnp.asarray(key_mask).astype(bool)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & valid[:, None, :])[:, None]


def within_segments(mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """``mask`` (``[batch, 1, q, k]``) cut to each token's own packed sequence; unchanged where
    ``segment_ids`` is ``None`` (rows not packed)."""
    return mask if segment_ids is None else mask & segment_mask(segment_ids)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """``[batch, seq]`` positions that restart at 0 where each segment of a packed row begins (a
    run of equal ``segment_ids``), as each sequence's own positions would be unpacked."""
    segment_ids = jnp.asarray(segment_ids)
    return segment_cumsum(jnp.ones(segment_ids.shape, jnp.int32), segment_ids) - 1


def segment_cumsum(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The running sum of ``values`` (``[batch, seq]``, non-negative) along each row, restarting
    where each segment of a packed row begins: what ``cumsum`` gives each sequence unpacked."""
    segment_ids = jnp.asarray(segment_ids)
    total = jnp.cumsum(values, axis=1)
    begins = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    # the sum before each segment's first element, carried along it (non-decreasing: values >= 0)
    return total - jax.lax.cummax(jnp.where(begins, total - values, 0), axis=1)


# Causal attention computes, for each block of this many queries, only the keys up to the block's
# last query (fewer products and a shorter softmax: 3/4 of the work at 256 tokens). On a 2-core
# AVX2 host (float32, 4 x 8 heads x 64, forward and backward) against the whole square: 256
# tokens 37 -> 26 ms (2 blocks), 512 tokens 192 -> 127-129 ms (2 or 4), 1024 tokens 604 -> 334
# ms (8 blocks of 128; 16 blocks of 64 took 461). Blocks below 128 queries cost more in small
# matmuls than they save; past 16 blocks they grow instead, so a program stays 16 blocks long.
CAUSAL_QUERY_BLOCK = 128
MAX_CAUSAL_BLOCKS = 16


def causal_blocks(q_len: int, k_len: int, causal_offset: int | None) -> list[tuple[int, int, int]] | None:
    """``(query start, query end, key end)`` of each block of queries of a causal attention whose query
    ``i`` sees no key after slot ``i + causal_offset``; ``None``: one block (not causal, or too short)."""
    if causal_offset is None or q_len < 2 * CAUSAL_QUERY_BLOCK:
        return None
    bounds = np.linspace(0, q_len, min(q_len // CAUSAL_QUERY_BLOCK, MAX_CAUSAL_BLOCKS) + 1).astype(int)
    blocks = [(int(a), int(e), min(k_len, int(e) + causal_offset)) for a, e in zip(bounds[:-1], bounds[1:])]
    return blocks if blocks[0][2] < k_len else None


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    softcap: float | None = None,
    causal_offset: int | None = None,
    sinks: jax.Array | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention with grouped-query heads; the softmax runs in float32.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k, v: ``[batch, k_len, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads``. The
        values' head dim may differ from the keys' (the result has the values').
      mask: boolean ``[batch, 1, q_len, k_len]`` (see ``attention_mask_4d``).
      dropout_rate: dropout on the attention probabilities, applied only with ``dropout_rng``.
      softcap: if set, the scaled logits become ``softcap * tanh(logits / softcap)`` before the
        mask (Gemma 2's ``attn_logit_softcapping``).
      causal_offset: a promise that ``mask`` hides from query ``i`` every key after slot
        ``i + causal_offset`` (a causal decoder without a cache: its prefix length). Blocks of
        queries then skip the keys none of them sees. The result is the same: a query whose keys
        are all masked gets the mean of all values either way, as from a softmax of equal logits.
        Ignored with attention dropout (its mask is drawn for the whole square).
      sinks: ``[heads]`` logits (GPT-OSS's attention sinks): each head's joins every query's
        softmax as one more key without a value, and its share is dropped after it; a query that
        sees no key then gets (almost) nothing instead of the values' mean.
      bias: ``[batch, heads, k_len]`` added to every query's scaled logits of each key (BLOOM's
        ALiBi: a slope per head times the key's position).
    """
    # the operations' names in a profile carry "attention" (benchmarks/step_profile.py reads them)
    with jax.named_scope("attention"):
        blocks = None if mask is None or (dropout_rate and dropout_rng is not None) else (
            causal_blocks(q.shape[1], k.shape[1], causal_offset))
        # heads-major [batch, kv_heads, len, head_dim], once: the blocks read slices of them
        qh, kh, vh = _heads_major(q, k.shape[2]), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if blocks is None:
            return _tokens_major(_attention_heads_major(qh, kh, vh, mask, scale=scale, softcap=softcap,
                                                        dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                                                        sinks=sinks, bias=bias))
        # [b, kv_heads, d]: the answer of a query row that sees no key, as the whole square gives it
        mean_v = jnp.mean(v.astype(jnp.float32), axis=1).astype(v.dtype)
        if sinks is not None:  # the sink takes the whole softmax of such a row
            mean_v = jnp.zeros_like(mean_v)
        outs = []
        for start, end, key_end in blocks:
            block_mask = mask[:, :, start:end, :key_end]
            out = _attention_heads_major(qh[:, :, :, start:end], kh[:, :, :key_end], vh[:, :, :key_end], block_mask,
                                         scale=scale, softcap=softcap, sinks=sinks,
                                         bias=None if bias is None else bias[..., :key_end])
            seen = jnp.any(block_mask, axis=-1)[:, :, None, :, None]  # [b, 1, 1, block, 1]
            outs.append(jnp.where(seen, out, mean_v[:, :, None, None, :]))
        return _tokens_major(jnp.concatenate(outs, axis=3))


def static_index(cache_index) -> int | None:
    """``cache_index`` as an ``int`` when it is known while tracing (``None``, a Python or NumPy
    integer; ``None`` counts as 0), else ``None`` (a traced index, as in a decoding loop)."""
    if cache_index is None:
        return 0
    if isinstance(cache_index, (int, np.integer)) and not isinstance(cache_index, bool):
        return int(cache_index)
    return None


def causal_offset(cache, prefix, cache_index=None) -> int | None:
    """A causal decoder layer's ``causal_offset`` for :func:`dot_product_attention`.

    Query ``i`` of a call sits at key slot ``i + V + c`` after a prefix of ``V`` entries and ``c``
    cached tokens, and sees no key after it. Without a KV cache ``c`` is 0; with one, ``c`` is the
    slot the call writes its first key at, which must be known while tracing (generate's prefill
    writes at 0); a traced ``cache_index`` gives ``None``: one block.
    """
    start = 0 if cache is None else static_index(cache_index)
    if start is None:
        return None
    return start + (0 if prefix is None else int(prefix[0].shape[1]))


def _heads_major(q: jax.Array, kv_heads: int) -> jax.Array:
    """``[batch, q_len, heads, d]`` queries as ``[batch, kv_heads, group, q_len, d]``."""
    b, sq, h, d = q.shape
    return q.reshape(b, sq, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _tokens_major(out: jax.Array) -> jax.Array:
    """``[batch, kv_heads, group, q_len, d]`` back to ``[batch, q_len, heads, d]``."""
    b, kvh, g, sq, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, sq, kvh * g, d)


def _attention_heads_major(qh, kh, vh, mask, *, scale, softcap, dropout_rate=0.0, dropout_rng=None, sinks=None,
                           bias=None):
    """Attention of heads-major queries ``[b, kv_heads, group, q, d]`` over heads-major keys and values
    ``[b, kv_heads, k, d]``; the result heads-major too (with ``mask`` ``[b, 1, q, k]``, or ``None``)."""
    b, kvh, g, sq, d = qh.shape
    sk = kh.shape[2]
    # [batch, kv_heads, group * q_len, head_dim]: two plain batched matmuls, which XLA:CPU runs
    # (with their gradients) 1.3-1.9x faster than the equivalent 5-D einsums
    scores = jnp.matmul(qh.reshape(b, kvh, g * sq, d), kh.swapaxes(-1, -2)).astype(jnp.float32)
    scores = scores.reshape(b, kvh, g, sq, sk) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if bias is not None:  # [b, heads, k] -> [b, kv_heads, group, 1, k]
        scores = scores + bias.astype(jnp.float32).reshape(b, kvh, g, 1, sk)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    if sinks is not None:  # one more logit per head, dropped after the softmax
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kvh, g, 1, 1), (b, kvh, g, sq, 1))
        probs = softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :sk]
    else:
        probs = softmax(scores, axis=-1)
    probs = probs.astype(vh.dtype).reshape(b, kvh, g * sq, sk)
    probs = dropout(probs, dropout_rate, dropout_rng)
    return jnp.matmul(probs, vh).reshape(b, kvh, g, sq, vh.shape[-1])  # values may be narrower (DeepSeek's)


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


def check_prefix_kv(prefix_kv, *, num_layers: int, kv_heads: int, head_dim: int, batch: int, owner: str) -> int:
    """Validates prefix keys/values for ``owner``'s layers; returns the prefix length ``V``.

    Raises:
      ValueError: the number of pairs or a shape is wrong (every mismatch is listed).
    """
    pairs = list(prefix_kv)
    if len(pairs) != num_layers or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"{owner}: prefix_kv must hold one (key, value) pair per layer ({num_layers}), got "
            f"{len(pairs)} entries"
        )
    length = pairs[0][0].shape[1] if pairs[0][0].ndim == 4 else -1
    bad = []
    for i, (k, v) in enumerate(pairs):
        for name, t in (("key", k), ("value", v)):
            shape = tuple(t.shape)
            if len(shape) != 4 or shape[0] not in (1, batch) or shape[1:] != (length, kv_heads, head_dim):
                bad.append(f"layer {i} {name} {shape}")
    if bad:
        raise ValueError(
            f"{owner}: prefix_kv entries must be [batch ({batch}) or 1, V, kv_heads ({kv_heads}), "
            f"head_dim ({head_dim})]; found {', '.join(bad[:8])}"
        )
    return int(length)


class DecoderPositions(NamedTuple):
    """Where a decoder call's tokens sit, from :func:`decoder_positions`."""

    # the cache slot of the first new token (0 without a cache); an int where the caller's
    # cache_index is one (generate's prefill: 0), so the layers know it while tracing
    start: jax.Array | int
    query_positions: jax.Array  # [s]: each new token's index among the keys (prefix entries first)
    # [b, s]: the given ones, or counted on from the prefix and cache; without a cache, a NumPy
    # array (known while tracing: RoPE's cos and sin become constants)
    position_ids: jax.Array | np.ndarray
    key_mask: jax.Array  # [b, V + keys]: which keys a token may attend (prefix entries always)
    num_prefix: int  # V, the prefix length (0 without prefix_kv)


def decoder_positions(
    batch: int,
    seq: int,
    *,
    attention_mask,
    position_ids,
    cache,
    cache_index,
    prefix_kv,
    num_layers: int,
    prefix_layout: Callable[[], tuple[int, int]],
    owner: str,
) -> DecoderPositions:
    """The positions and key mask a decoder's call needs, with or without a KV cache and prefix.

    ``prefix_layout()`` gives ``(kv_heads, head_dim)`` of the layers' attention; it is called
    only to check a ``prefix_kv``. After a prefix of V entries, positions start at V, as they do
    after V cached tokens (transformers 5 does the same).
    """
    num_prefix = 0
    if prefix_kv is not None:
        kv_heads, head_dim = prefix_layout()
        num_prefix = check_prefix_kv(
            prefix_kv, num_layers=num_layers, kv_heads=kv_heads, head_dim=head_dim, batch=batch, owner=owner
        )
    start = static_index(cache_index)
    if start is None:
        start = jnp.asarray(cache_index, jnp.int32)
    query_positions = start + jnp.arange(seq) + num_prefix
    if position_ids is None and cache_index is None:
        position_ids = np.broadcast_to(np.arange(num_prefix, num_prefix + seq, dtype=np.int32), (batch, seq))
    elif position_ids is None:
        position_ids = jnp.broadcast_to(query_positions, (batch, seq))
    else:
        position_ids = jnp.asarray(position_ids)
    key_len = seq if cache is None else cache[0]["k"].shape[1]
    if attention_mask is None:
        attention_mask = jnp.ones((batch, key_len), bool)
    key_mask = prefix_key_mask(jnp.asarray(attention_mask), num_prefix)
    return DecoderPositions(start, query_positions, position_ids, key_mask, num_prefix)


def alibi_key_positions(key_mask, dtype=jnp.float32) -> jax.Array:
    """Each key's ALiBi position ``[batch, keys]``: its count among the row's real keys (0 on padding).
    Softmax's translation invariance makes it equivalent to the slot index transformers' BLOOM, Falcon
    and MPT read where the row's real keys are contiguous, packed rows included."""
    key_mask = jnp.asarray(key_mask, jnp.int32)
    return ((jnp.cumsum(key_mask, axis=1) - 1) * key_mask).astype(dtype)


def prefix_key_mask(key_mask: jax.Array, num_prefix: int) -> jax.Array:
    """``[batch, V + k]``: the prefix entries (always visible) before a ``[batch, k]`` key mask."""
    if not num_prefix:
        return key_mask
    ones = jnp.ones((key_mask.shape[0], num_prefix), key_mask.dtype)
    return jnp.concatenate([ones, key_mask], axis=1)


def prepend_prefix(x: jax.Array, prefix: jax.Array | None) -> jax.Array:
    """``concat(prefix, x)`` along the sequence axis of ``[batch, len, heads, head_dim]`` arrays."""
    if prefix is None:
        return x
    prefix = jnp.broadcast_to(prefix.astype(x.dtype), (x.shape[0], *prefix.shape[1:]))
    return jnp.concatenate([prefix, x], axis=1)
