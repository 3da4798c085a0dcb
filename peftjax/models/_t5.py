"""T5 (encoder-decoder) in Flax NNX, with transformers' module names.

As transformers 5's ``modeling_t5``: a shared token embedding (``shared``) feeding an encoder and
a decoder stack (``encoder.block.N.layer.0.SelfAttention.q`` ...,
``decoder.block.N.layer.1.EncDecAttention``), RMS layer norms without bias or mean (the variance in
float32), no biases anywhere, unscaled attention scores plus a learned relative position bias that
only block 0 of each stack owns (bidirectional buckets in the encoder, causal in the decoder) and
every block of that stack reuses; cross-attention has no position bias. The feed-forward is
``relu`` (T5 v1.0) or gated (``gated-gelu``: v1.1 / FLAN, ``gelu_new``). The decoder output is
scaled by ``d_model ** -0.5`` before ``lm_head`` when ``scale_decoder_outputs`` (transformers 5:
the checkpoint's ``tie_word_embeddings`` was not false, i.e. T5 v1.0).

``lm_head`` is tied to ``shared`` (absent here: the logits are ``shared.attend``) unless the
checkpoint holds an ``lm_head.weight`` that differs from ``shared.weight`` (v1.1 / FLAN), as
transformers 5 decides it on load; ``from_config`` builds it tied, as transformers does.

Classes: ``T5ForConditionalGeneration`` (``SEQ_2_SEQ_LM``, with ``generate``), ``T5EncoderModel``,
``T5Model`` and ``T5ForSequenceClassification`` (read at each row's last EOS). ``remat`` wraps each
block in ``jax.checkpoint`` when there is no cache and no prefix.

A call given ``dropout_rng`` applies ``dropout_rate`` where transformers' ``.train()`` does (the
embeddings, attention probabilities, each sublayer's output, the feed-forward's hidden units, each
stack's final output; ``classifier_dropout`` in the classification head); without one the model
is in eval mode. Not implemented (named in an error): ``scan_layers`` (block 0 owns the relative
position bias, so the blocks are not identical and are looped).
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._encoder_decoder import (
    EncoderDecoder,
    check_ids,
    classified_at_last_eos,
    cross_attention_mask,
    last_eos,
)
from peftjax.nn._dropout import layer_key, split_keys
from peftjax.models._losses import (
    check_span_labels,
    masked_cross_entropy,
    span_outputs,
    token_labels_loss,
)
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._outputs import ModelOutput
from peftjax.nn._scan import check_remat, checkpointed
from peftjax.models._seq2seq_generation import Seq2SeqGenerationMixin
from peftjax.nn._norm import RMSNorm
from peftjax.nn._activations import ACTIVATIONS

# torch-only keys: the stacks' copies of ``shared`` and a never-used bias transformers skips too
_IGNORED = (
    r"(transformer\.)?(encoder|decoder)\.embed_tokens\.weight",
    r"(transformer\.)?decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)


def feed_forward(config) -> tuple[str, bool]:
    """``(activation, gated)`` from ``feed_forward_proj``, as ``T5Config`` derives them.

    Raises:
      ValueError: ``feed_forward_proj`` is not ``<act>`` or ``gated-<act>`` with a supported act.
    """
    proj = getattr(config, "feed_forward_proj", "relu")
    parts = str(proj).split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {proj!r} is not of the form '<act>' or 'gated-<act>' (e.g. 'relu', "
                         "'gated-gelu')")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # transformers' backwards-compatible alias
    if act not in ACTIVATIONS:
        raise ValueError(f"feed_forward_proj {proj!r}: activation {act!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}")
    return act, len(parts) == 2


def scale_decoder_outputs(config) -> bool:
    """Whether the decoder output is scaled by ``d_model ** -0.5`` (transformers 5's rule; mT5 never is)."""
    if getattr(config, "model_type", "t5") == "mt5":
        return False
    scale = getattr(config, "scale_decoder_outputs", None)
    return bool(getattr(config, "tie_word_embeddings", True) is not False if scale is None else scale)


def per_layer_bias(config) -> bool:
    """Whether every block owns its relative position bias (UMT5), not only block 0 (T5, mT5)."""
    return getattr(config, "model_type", "t5") == "umt5"


def _check_config(config) -> None:
    feed_forward(config)
    if getattr(config, "scan_layers", False):
        why = ("block 0 of each stack owns the relative position bias, so the blocks are not identical"
               if not per_layer_bias(config) else "the stacked UMT5 blocks are not implemented")
        name = {"mt5": "mT5", "umt5": "UMT5"}.get(getattr(config, "model_type", "t5"), "T5")
        raise ValueError(f"scan_layers=True is not supported for {name}: {why} (use scan_layers=False)")


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """transformers' ``T5Attention._relative_position_bucket``: ``key - query`` distances to buckets."""
    rel = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # float32 throughout, as torch computes it (log of 0 is never selected: those are small)
    scaled = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact) / jnp.float32(
        math.log(max_distance / max_exact)) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


def _linear(din, dout, kw):
    return nnx.Linear(din, dout, use_bias=False, **kw)


class T5Attention(nnx.Module):
    """``q``, ``k``, ``v``, ``o`` (no biases, no scaling) and, in block 0, ``relative_attention_bias``."""

    def __init__(self, config, *, has_relative_attention_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.dropout_rate = float(getattr(config, "dropout_rate", 0.0) or 0.0)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = self.num_heads * self.head_dim
        self.q = _linear(config.d_model, inner, kw)
        self.k = _linear(config.d_model, inner, kw)
        self.v = _linear(config.d_model, inner, kw)
        self.o = _linear(inner, config.d_model, kw)
        self.relative_attention_bias = nnx.data(None)
        if has_relative_attention_bias:
            self.relative_attention_bias = nnx.Embed(self.num_buckets, self.num_heads, **kw)

    def position_bias(self, query_positions, key_positions, *, bidirectional: bool):
        """``[1, heads, q, k]`` bias for queries and keys at the given positions."""
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=self.num_buckets,
                                           max_distance=self.max_distance)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None].astype(jnp.float32)

    def heads(self, proj, x):
        b, s, _ = x.shape
        return proj(x).reshape(b, s, self.num_heads, self.head_dim)

    def __call__(self, x, mask, bias, kv=None, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """Attends ``x``'s queries over its own keys (``kv`` None) or over given ``(key, value)``;
        ``dropout_rng`` drops attention probabilities at ``dropout_rate`` (training)."""
        b, s, _ = x.shape
        q = self.heads(self.q, x)
        if kv is None:
            k, v = self.heads(self.k, x), self.heads(self.v, x)
        else:
            k, v = kv
        if cache is not None:
            cache = attn.update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]
        if prefix is not None:
            k, v = attn.prepend_prefix(k, prefix[0]), attn.prepend_prefix(v, prefix[1])
        out = attn.dropped_attention(q, k, v, mask, bias=bias, rate=self.dropout_rate, rng=dropout_rng)
        return self.o(out.reshape(b, s, -1)), cache


def _norm(config, kw) -> nnx.RMSNorm:
    # T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, no mean, no bias, statistics in float32
    return RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon, **kw)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config, *, has_relative_attention_bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.SelfAttention = T5Attention(config, has_relative_attention_bias=has_relative_attention_bias, **kw)
        self.layer_norm = _norm(config, kw)
        self.dropout_rate = self.SelfAttention.dropout_rate

    def __call__(self, x, mask, bias, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        inner, outer = split_keys(dropout_rng, 2)
        a, cache = self.SelfAttention(self.layer_norm(x), mask, bias, None, cache, cache_index, prefix, inner)
        return x + dropout(a, self.dropout_rate, outer), cache


class T5LayerCrossAttention(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, **kw)
        self.layer_norm = _norm(config, kw)
        self.dropout_rate = self.EncDecAttention.dropout_rate

    def kv(self, encoder_hidden):
        """The encoder output's keys and values: computed once per input, reused at every step."""
        a = self.EncDecAttention
        return a.heads(a.k, encoder_hidden), a.heads(a.v, encoder_hidden)

    def __call__(self, x, kv, mask, prefix=None, dropout_rng=None):
        inner, outer = split_keys(dropout_rng, 2)
        a, _ = self.EncDecAttention(self.layer_norm(x), mask, None, kv, prefix=prefix, dropout_rng=inner)
        return x + dropout(a, self.dropout_rate, outer)


class T5DenseActDense(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = feed_forward(config)[0]
        self.wi = _linear(config.d_model, config.d_ff, kw)
        self.wo = _linear(config.d_ff, config.d_model, kw)
        self.dropout_rate = float(getattr(config, "dropout_rate", 0.0) or 0.0)

    def __call__(self, x, dropout_rng=None):
        return self.wo(dropout(ACTIVATIONS[self.act](self.wi(x)), self.dropout_rate, dropout_rng))


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = feed_forward(config)[0]
        self.wi_0 = _linear(config.d_model, config.d_ff, kw)
        self.wi_1 = _linear(config.d_model, config.d_ff, kw)
        self.wo = _linear(config.d_ff, config.d_model, kw)
        self.dropout_rate = float(getattr(config, "dropout_rate", 0.0) or 0.0)

    def __call__(self, x, dropout_rng=None):
        return self.wo(dropout(ACTIVATIONS[self.act](self.wi_0(x)) * self.wi_1(x), self.dropout_rate, dropout_rng))


class T5LayerFF(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dense = T5DenseGatedActDense if feed_forward(config)[1] else T5DenseActDense
        self.DenseReluDense = dense(config, **kw)
        self.layer_norm = _norm(config, kw)
        self.dropout_rate = self.DenseReluDense.dropout_rate

    def __call__(self, x, dropout_rng=None):
        inner, outer = split_keys(dropout_rng, 2)
        return x + dropout(self.DenseReluDense(self.layer_norm(x), inner), self.dropout_rate, outer)


class T5Block(nnx.Module):
    """``layer``: self-attention, cross-attention (decoder only), feed-forward."""

    def __init__(self, config, *, is_decoder: bool, has_relative_attention_bias: bool, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        layers = [T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias, **kw)]
        if is_decoder:
            layers.append(T5LayerCrossAttention(config, **kw))
        layers.append(T5LayerFF(config, **kw))
        self.layer = nnx.List(layers)
        self.is_decoder = is_decoder

    def __call__(self, x, mask, bias, cross_kv=None, cross_mask=None, cache=None, cache_index=None, prefix=None,
                 dropout_rng=None):
        self_prefix, cross_prefix = (None, None) if prefix is None else prefix
        k_self, k_cross, k_ff = split_keys(dropout_rng, 3)
        x, cache = self.layer[0](x, mask, bias, cache, cache_index, self_prefix, k_self)
        if self.is_decoder:
            x = self.layer[1](x, cross_kv, cross_mask, cross_prefix, k_cross)
        return self.layer[-1](x, k_ff), cache


class T5Stack(nnx.Module):
    """The encoder or the decoder: ``block`` and ``final_layer_norm`` (the embedding is the model's ``shared``)."""

    def __init__(self, config, *, is_decoder: bool, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n = config.num_decoder_layers if is_decoder else config.num_layers
        if n is None:
            n = config.num_layers
        self.per_layer_bias = per_layer_bias(config)
        self.block = nnx.List([
            T5Block(config, is_decoder=is_decoder, has_relative_attention_bias=self.per_layer_bias or i == 0, **kw)
            for i in range(n)
        ])
        self.final_layer_norm = _norm(config, kw)
        self.is_decoder = is_decoder
        self.remat = check_remat(getattr(config, "remat", "none"))
        self.dropout_rate = float(getattr(config, "dropout_rate", 0.0) or 0.0)

    def cross_kv(self, encoder_hidden) -> list[tuple[jax.Array, jax.Array]]:
        """Each decoder block's cross-attention ``(key, value)`` of the encoder output."""
        return [block.layer[1].kv(encoder_hidden) for block in self.block]

    def __call__(self, x, key_mask, *, cross_kv=None, cross_mask=None, cache=None, cache_index=None,
                 prefix_kv=None, dropout_rng=None, input_ids=None):
        """Runs the blocks on embeddings ``x`` ``[b, s, d]`` (``input_ids`` unread: T5's positions
        are relative).

        Args:
          key_mask: ``[b, keys]`` real-key mask of the self-attention (all cache slots with a cache).
          cross_kv: the decoder's per-block encoder ``(key, value)`` (:meth:`cross_kv`).
          cross_mask: ``[b, encoder len]`` real-token mask of the encoder output.
          cache, cache_index: the decoder's self-attention KV cache (``peftjax.models._attention``).
          prefix_kv: per block ``((self key, self value), (cross key, cross value) or None)``
            prefixes (the decoder), or ``(key, value)`` (the encoder).
          dropout_rng: a key for the config's ``dropout_rate`` where transformers' ``.train()`` drops:
            the embeddings, attention probabilities, each sublayer's output, the feed-forward's
            hidden units and the final norm's output.
        """
        b, s, _ = x.shape
        k_embed, k_final, k_blocks = split_keys(dropout_rng, 3)
        x = dropout(x, self.dropout_rate, k_embed)
        num_prefix = 0
        if prefix_kv is not None:
            first = prefix_kv[0][0] if self.is_decoder else prefix_kv[0]
            num_prefix = first[0].shape[1]
        start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        query_positions = num_prefix + start + jnp.arange(s)
        key_mask = attn.prefix_key_mask(jnp.asarray(key_mask).astype(bool), num_prefix)
        key_positions = jnp.arange(key_mask.shape[1])
        mask = attn.attention_mask_4d(query_positions, key_mask, causal=self.is_decoder)
        def position_bias(block):
            return block.layer[0].SelfAttention.position_bias(query_positions, key_positions,
                                                              bidirectional=not self.is_decoder)

        bias = position_bias(self.block[0])
        cross = cross_attention_mask(cross_mask, prefix_kv) if self.is_decoder else None
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.block):
            prefix = None if prefix_kv is None else prefix_kv[i]
            if not self.is_decoder and prefix is not None:
                prefix = (prefix, None)
            layer_cache = None if cache is None else cache[i]
            kv = None if cross_kv is None else cross_kv[i]
            key = layer_key(k_blocks, i)
            if self.per_layer_bias and i > 0:  # UMT5: each block's own bias
                bias = position_bias(block)
            if cache is None and prefix is None and self.remat != "none":
                graphdef, state = nnx.split(block)
                x = checkpointed(
                    lambda st, h, kv_, k, g=graphdef: nnx.merge(g, st)(h, mask, bias, kv_, cross, dropout_rng=k)[0],
                    self.remat,
                )(state, x, kv, key)
                continue
            x, layer_cache = block(x, mask, bias, kv, cross, layer_cache, start, prefix, key)
            if cache is not None:
                new_cache.append(layer_cache)
        return dropout(self.final_layer_norm(x), self.dropout_rate, k_final), new_cache


# set by ``from_state_dict`` while it builds the model: the checkpoint's lm_head is its own weight
_UNTIED_HEAD: contextvars.ContextVar[bool] = contextvars.ContextVar("peftjax_t5_untied_head", default=False)


def _has_own_lm_head(state_dict: Mapping) -> bool:
    """Whether ``state_dict`` holds an ``lm_head.weight`` that is not a copy of ``shared.weight``."""
    if "lm_head.weight" not in state_dict:
        return False
    shared = next((k for k in ("shared.weight", "transformer.shared.weight") if k in state_dict), None)
    return shared is None or not np.array_equal(np.asarray(state_dict["lm_head.weight"]),
                                                np.asarray(state_dict[shared]))


class _T5Base(PreTrainedModel):
    ignored_keys: ClassVar[tuple[str, ...]] = _IGNORED

    def _embed(self, ids, embeds):
        return self.shared(jnp.asarray(ids)) if embeds is None else jnp.asarray(embeds)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, prefix_kv=None,
               dropout_rng=None) -> ModelOutput:
        """The encoder's ``last_hidden_state`` ``[b, s, d_model]`` (``dropout_rng``: training's dropout)."""
        check_ids(input_ids, inputs_embeds, "")
        x = self._embed(input_ids, inputs_embeds)
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], bool)
        if prefix_kv is not None:
            a = self.encoder.block[0].layer[0].SelfAttention
            attn.check_prefix_kv(prefix_kv, num_layers=len(self.encoder.block), kv_heads=a.num_heads,
                                 head_dim=a.head_dim, batch=x.shape[0], owner=f"{type(self).__name__}.encoder")
        h, _ = self.encoder(x, attention_mask, prefix_kv=prefix_kv, dropout_rng=dropout_rng)
        return ModelOutput(last_hidden_state=h)


class T5EncoderModel(_T5Base):
    """The encoder alone: ``shared`` and ``encoder``.

    >>> from transformers import T5Config
    >>> model = T5EncoderModel.from_config(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48,
    ...                                             num_layers=2, num_heads=4))
    >>> model(input_ids=[[5, 6, 7]]).last_hidden_state.shape
    (1, 3, 32)
    """

    ignored_keys: ClassVar[tuple[str, ...]] = (*_IGNORED, r"decoder\..*", r"lm_head\.weight")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared = nnx.Embed(config.vocab_size, config.d_model, **kw)
        self.encoder = T5Stack(self.config, is_decoder=False, **kw)

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, prefix_kv=None,
                 dropout_rng=None) -> ModelOutput:
        """Encodes a batch; ``prefix_kv``: one ``(key, value)`` per encoder block (prefix attention protocol)."""
        return self.encode(input_ids, attention_mask, inputs_embeds, prefix_kv, dropout_rng)


class _T5EncoderDecoder(EncoderDecoder, _T5Base):
    """What T5's encoder-decoder classes share: the decoder pass (:class:`EncoderDecoder`) over
    T5's stacks."""

    def decoder_prefix_layout(self) -> tuple[int, int, int]:
        """``(blocks, heads, head_dim)`` of the decoder's attention."""
        a = self.decoder.block[0].layer[0].SelfAttention
        return len(self.decoder.block), a.num_heads, a.head_dim


class T5ForConditionalGeneration(Seq2SeqGenerationMixin, _T5EncoderDecoder):
    """Sequence-to-sequence LM: ``shared``, ``encoder``, ``decoder`` and (untied) ``lm_head``.

    >>> from transformers import T5Config
    >>> config = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
    ...                   decoder_start_token_id=0)
    >>> model = T5ForConditionalGeneration.from_config(config)
    >>> out = model(input_ids=[[5, 6, 7, 1]], labels=[[8, 9, 1]])
    >>> out.logits.shape, out.loss.shape
    ((1, 3, 96), ())
    >>> model.generate([[5, 6, 7, 1]], max_new_tokens=4).shape  # decoder_start_token_id first
    (1, 5)
    """

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared = nnx.Embed(config.vocab_size, config.d_model, **kw)
        self.encoder = T5Stack(self.config, is_decoder=False, **kw)
        self.decoder = T5Stack(self.config, is_decoder=True, **kw)
        self.lm_head = nnx.data(None)
        if _UNTIED_HEAD.get():
            self.lm_head = _linear(config.d_model, config.vocab_size, kw)
        self.scale_decoder_outputs = scale_decoder_outputs(config)

    @classmethod
    def from_state_dict(cls, config, state_dict, **kwargs):
        token = _UNTIED_HEAD.set(_has_own_lm_head(state_dict))
        try:
            return super().from_state_dict(config, state_dict, **kwargs)
        finally:
            _UNTIED_HEAD.reset(token)

    def _tied(self, key: str) -> bool:
        return self.lm_head is None and key == "lm_head.weight"

    def init_cache(self, batch: int, max_len: int, dtype=None):
        n, heads, head_dim = self.decoder_prefix_layout()
        return attn.init_kv_cache(n, batch, max_len, heads, head_dim, dtype or self.dtype)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        encoder_outputs=None,
        inputs_embeds=None,
        decoder_inputs_embeds=None,
        labels=None,
        cache=None,
        cache_index=None,
        cross_kv=None,
        prefix_kv=None,
        encoder_prefix_kv=None,
        dropout_rng=None,
    ) -> ModelOutput:
        """Encodes (unless ``encoder_outputs`` is given) and decodes.

        Args:
          input_ids / inputs_embeds: the encoder input ``[b, s]`` / ``[b, s, d_model]``.
          attention_mask: ``[b, s]`` encoder mask, 0 on padding (also masks the cross-attention).
          decoder_input_ids / decoder_inputs_embeds: the decoder input; default ``shift_right(labels)``.
          decoder_attention_mask: ``[b, t]`` (``[b, max_len]`` with a cache), 0 on padding.
          encoder_outputs: the encoder's last hidden state (array or ``ModelOutput``), to skip encoding.
          labels: ``[b, t]`` target ids, ``-100`` ignored: adds the mean cross entropy ``loss``.
          cache, cache_index: the decoder's self-attention KV cache (see ``init_cache``).
          cross_kv: the decoder's cross-attention keys/values (``decoder.cross_kv``), to skip them.
          prefix_kv: per decoder block ``((self key, self value), (cross key, cross value))``,
            each ``[b or 1, V, heads, d_kv]``, prepended as a cache of ``V`` entries would be.
          encoder_prefix_kv: per encoder block ``(key, value)``.
          dropout_rng: a ``jax.random`` key to apply the config's ``dropout_rate`` as transformers'
            ``.train()`` does; ``None`` (the default): none.

        Returns:
          ``ModelOutput`` with ``logits`` ``[b, t, vocab]``, ``loss``, ``last_hidden_state`` (the
          decoder's), ``encoder_last_hidden_state`` and ``past_key_values`` (with a cache).
        """
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.shift_right(labels)
        h, new_cache, enc = self.decode(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs, inputs_embeds,
            decoder_inputs_embeds, cache, cache_index, cross_kv, prefix_kv, encoder_prefix_kv, dropout_rng)
        if self.scale_decoder_outputs:
            h = h * self.config.d_model**-0.5
        logits = self.shared.attend(h) if self.lm_head is None else self.lm_head(h)
        loss = None if labels is None else masked_cross_entropy(logits, jnp.asarray(labels))
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h, past_key_values=new_cache,
                           encoder_last_hidden_state=enc)


class T5Model(_T5EncoderDecoder):
    """The bare encoder-decoder: ``shared``, ``encoder``, ``decoder``; returns the decoder's output."""

    ignored_keys: ClassVar[tuple[str, ...]] = (*_IGNORED, r"lm_head\.weight")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared = nnx.Embed(config.vocab_size, config.d_model, **kw)
        self.encoder = T5Stack(self.config, is_decoder=False, **kw)
        self.decoder = T5Stack(self.config, is_decoder=True, **kw)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, prefix_kv=None,
                 encoder_prefix_kv=None, dropout_rng=None) -> ModelOutput:
        """``last_hidden_state`` (the decoder's, unscaled) and ``encoder_last_hidden_state``."""
        h, _, enc = self.decode(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs, inputs_embeds,
            decoder_inputs_embeds, prefix_kv=prefix_kv, encoder_prefix_kv=encoder_prefix_kv, dropout_rng=dropout_rng)
        return ModelOutput(last_hidden_state=h, encoder_last_hidden_state=enc)


class T5ClassificationHead(nnx.Module):
    """``dense`` (tanh) then ``out_proj``, both with biases; ``classifier_dropout`` before each in training."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense = nnx.Linear(config.d_model, config.d_model, **kw)
        self.out_proj = nnx.Linear(config.d_model, config.num_labels, **kw)
        self.dropout_rate = float(getattr(config, "classifier_dropout", 0.0) or 0.0)

    def __call__(self, x, dropout_rng=None):
        first, second = split_keys(dropout_rng, 2)
        h = jnp.tanh(self.dense(dropout(x, self.dropout_rate, first)))
        return self.out_proj(dropout(h, self.dropout_rate, second))


class T5ForSequenceClassification(PreTrainedModel):
    """``transformer`` (a :class:`T5Model`) and a ``classification_head`` read at each row's last EOS.

    As transformers: the decoder input defaults to ``shift_right(input_ids)``, and every row must
    hold the same number (at least one) of ``eos_token_id`` tokens.
    """

    base_model_prefix: ClassVar[str] = "transformer"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classification_head\.(dense|out_proj)\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*_IGNORED, r"lm_head\.weight")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transformer = T5Model(self.config, **kw)
        self.classification_head = T5ClassificationHead(self.config, **kw)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, inputs_embeds=None, decoder_inputs_embeds=None, dropout_rng=None) -> ModelOutput:
        """Classifies a batch; ``labels`` (``[batch]`` ints, or floats for regression) add the loss.

        Raises:
          ValueError: ``input_ids`` is missing (it locates the EOS tokens), or (outside ``jit``) a
            row has no EOS or the rows differ in their number of EOS tokens.
        """
        last = last_eos(input_ids, self.config, type(self).__name__)
        ids = jnp.asarray(input_ids)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.transformer.shift_right(ids)
        body_key, head_key = split_keys(dropout_rng, 2)
        out = self.transformer(ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                               inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds,
                               dropout_rng=body_key)
        return classified_at_last_eos(self.classification_head, out, last, labels, self.config, head_key)


class T5ForTokenClassification(PreTrainedModel):
    """Token classification (PEFT's ``TOKEN_CLS``): ``transformer`` (a :class:`T5EncoderModel`, the
    encoder alone), dropout (``classifier_dropout``) and a biased ``classifier`` on every token, as
    transformers'. A conditional-generation checkpoint's encoder loads into it (its decoder and
    ``lm_head`` are ignored)."""

    base_model_prefix: ClassVar[str] = "transformer"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = T5EncoderModel.ignored_keys

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transformer = T5EncoderModel(self.config, **kw)
        self.dropout_rate = float(getattr(self.config, "classifier_dropout", 0.0) or 0.0)
        self.classifier = nnx.Linear(self.config.d_model, self.config.num_labels, **kw)

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, prefix_kv=None,
                 dropout_rng=None) -> ModelOutput:
        """Classifies every token, ``[batch, seq, num_labels]``; ``labels`` (``[batch, seq]`` ints,
        ``-100`` where no label counts) add the mean cross entropy over the labelled tokens."""
        body_key, head_key = split_keys(dropout_rng, 2)
        h = self.transformer(input_ids, attention_mask, inputs_embeds, prefix_kv, body_key).last_hidden_state
        logits = self.classifier(dropout(h, self.dropout_rate, head_key))
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels), last_hidden_state=h)


class T5ForQuestionAnswering(T5Model):
    """Extractive question answering (PEFT's ``QUESTION_ANS``), as transformers': the encoder-decoder
    (``shared``, ``encoder``, ``decoder``, the checkpoint's own keys) fed ``shift_right(input_ids)``
    as the decoder's input unless given one, and a biased ``qa_outputs`` giving every decoder
    position a start and an end logit."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"qa_outputs\.(weight|bias)",)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        check_span_labels(self, self.config)
        self.qa_outputs = nnx.Linear(self.config.d_model, 2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_outputs=None, start_positions=None, end_positions=None, inputs_embeds=None,
                 decoder_inputs_embeds=None, prefix_kv=None, encoder_prefix_kv=None, dropout_rng=None) -> ModelOutput:
        """``start_logits`` and ``end_logits``, ``[batch, decoder seq]``; ``start_positions`` and
        ``end_positions`` (``[batch]`` token indices) add transformers' loss (:func:`span_loss`).

        Raises:
          ValueError: neither ``decoder_input_ids`` nor ``decoder_inputs_embeds`` nor ``input_ids``
            (which the decoder's input is shifted from) is given.
        """
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError(f"{type(self).__name__} shifts input_ids right into the decoder's input: pass "
                                 "input_ids, or decoder_input_ids / decoder_inputs_embeds")
            decoder_input_ids = self.shift_right(input_ids)
        out = super().__call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                               inputs_embeds, decoder_inputs_embeds, prefix_kv, encoder_prefix_kv, dropout_rng)
        logits = self.qa_outputs(out.last_hidden_state)
        return ModelOutput(**span_outputs(logits, start_positions, end_positions),
                           encoder_last_hidden_state=out.encoder_last_hidden_state)


class MT5ForQuestionAnswering(T5ForQuestionAnswering):
    """mT5's question answering: T5's."""


class UMT5ForQuestionAnswering(T5ForQuestionAnswering):
    """UMT5's question answering: T5's, every block with its own relative position bias."""


class MT5ForSequenceClassification(T5ForSequenceClassification):
    """mT5's sequence classifier: T5's (its decoder output is never scaled, which the head does not read)."""


class UMT5ForSequenceClassification(T5ForSequenceClassification):
    """UMT5's sequence classifier: T5's, every block with its own relative position bias."""


class MT5ForTokenClassification(T5ForTokenClassification):
    """mT5's token classifier: T5's."""


class UMT5ForTokenClassification(T5ForTokenClassification):
    """UMT5's token classifier: T5's, every block with its own relative position bias."""


class MT5ForConditionalGeneration(T5ForConditionalGeneration):
    """mT5: T5 v1.1's architecture (gated-gelu, its own ``lm_head``) whose decoder output is never
    scaled, as transformers' ``MT5ForConditionalGeneration``."""


class UMT5ForConditionalGeneration(T5ForConditionalGeneration):
    """UMT5: as T5, but every block's self-attention owns a relative position bias
    (``encoder.block.N.layer.0.SelfAttention.relative_attention_bias``), as transformers'
    ``UMT5ForConditionalGeneration``; the decoder output is scaled as in T5 (``tie_word_embeddings``)."""


register(T5ForConditionalGeneration, model_types=("t5",), default=True)
register(MT5ForConditionalGeneration, model_types=("mt5",), default=True)
register(UMT5ForConditionalGeneration, model_types=("umt5",), default=True)
register(T5EncoderModel)
register(T5Model)
for _cls in (T5ForSequenceClassification, MT5ForSequenceClassification, UMT5ForSequenceClassification,
             T5ForTokenClassification, MT5ForTokenClassification, UMT5ForTokenClassification,
             T5ForQuestionAnswering, MT5ForQuestionAnswering, UMT5ForQuestionAnswering):
    register(_cls)
