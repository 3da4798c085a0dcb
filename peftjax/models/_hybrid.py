"""What the hybrid decoders share (Qwen3.5's and Qwen3-Next's linear attention, LFM2's short
convolutions): recurrent layers with no keys to prefix, a padding mask those layers zero their
input with (transformers' ``apply_mask_to_padding_states``), and caches in which only the attention
layers know the slots."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peftjax.models import _attention as attn


class HybridInputs(NamedTuple):
    """A hybrid decoder call's inputs, settled: ``x`` (the embeddings), ``attention_mask`` (the
    cache's slots where a cache is given without one), ``segment_ids``, the positions ``pos``, the
    attention layers' ``mask`` and ``cos``/``sin``, and the recurrent layers' ``token_mask``
    (``[batch, seq]``, 0 on padding; ``None`` for one decoded token, never padding). ``cos`` and ``sin``
    are ``None`` in a decoder without RoPE (``model.rotary`` ``None``)."""

    x: jax.Array
    attention_mask: jax.Array | None
    segment_ids: jax.Array | None
    pos: attn.DecoderPositions
    mask: jax.Array
    token_mask: jax.Array | None
    cos: jax.Array | None
    sin: jax.Array | None


def hybrid_inputs(model, input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                  segment_ids, *, recurrent: str) -> HybridInputs:
    """The inputs of ``model`` (a ``LlamaModel`` of hybrid layers) for one call.

    Raises:
      ValueError: ``prefix_kv`` given (``recurrent`` names the layers that have no keys to prefix).
    """
    if prefix_kv is not None:
        raise ValueError(f"{type(model).__name__}: prefix_kv is not supported: the {recurrent} layers have no keys "
                         "and values to prepend a prefix to")
    segment_ids, attention_mask, position_ids = model.packed_inputs(segment_ids, attention_mask, position_ids, cache,
                                                                    None)
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(jnp.asarray(input_ids))
    x = jnp.asarray(inputs_embeds)
    b, s, _ = x.shape
    if attention_mask is None and cache is not None:
        attention_mask = jnp.ones((b, cache_length(cache, s)), jnp.int32)
    pos = attn.decoder_positions(
        b, s, attention_mask=attention_mask, position_ids=position_ids, cache=None, cache_index=cache_index,
        prefix_kv=None, num_layers=len(model.layers), owner=type(model).__name__, prefix_layout=lambda: (0, 0),
    )
    mask = attn.within_segments(attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True), segment_ids)
    token_mask = None
    if attention_mask is not None and s > 1:  # a decoded token is never padding (transformers' rule too)
        token_mask = jax.lax.dynamic_slice_in_dim(jnp.asarray(attention_mask), pos.start, s, axis=1)
    cos, sin = (None, None) if model.rotary is None else model.rotary.cos_sin(pos.position_ids, x.dtype)
    return HybridInputs(x, attention_mask, segment_ids, pos, mask, token_mask, cos, sin)


def cache_length(cache, default: int) -> int:
    """The slots of the attention layers' caches (``default`` where no layer attends)."""
    return next((c["k"].shape[1] for c in cache if "k" in c), default)
