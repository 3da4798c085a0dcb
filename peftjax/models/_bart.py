"""BART, mBART, Marian, Pegasus and M2M100 (encoder-decoders) in Flax NNX, with transformers' names.

As transformers 5's ``modeling_bart``: a shared token embedding (``model.shared``, times
``sqrt(d_model)`` when ``scale_embedding``) feeding an encoder and a decoder
(``model.encoder.layers.N.self_attn.q_proj`` ..., ``model.decoder.layers.N.encoder_attn``), each
adding learned positions (``embed_positions``, rows offset by 2) and normalising them
(``layernorm_embedding``); biased ``q_proj``/``k_proj``/``v_proj``/``out_proj`` with queries scaled by
``head_dim ** -0.5``; LayerNorms (epsilon 1e-5) after each residual sublayer (BART) or before it,
with a final ``layer_norm`` per stack (mBART); ``fc1``/``fc2`` around ``activation_function``. The
decoder's positions count its cache, so a prefix (PEFT's prefix tuning fills the self-attention
cache with it) shifts them, as in transformers. ``lm_head`` is ``model.shared`` (tied) unless
``tie_word_embeddings`` is false, plus the checkpoint's ``final_logits_bias`` (a ``Buffer``: never trained, not
counted among the parameters, as transformers keeps it).

Classes: ``BartForConditionalGeneration`` (``SEQ_2_SEQ_LM``, with ``generate``), ``BartModel``,
``BartForSequenceClassification`` (read at each row's last EOS) and ``BartForQuestionAnswering``,
and the same four for mBART, whose decoder input is the labels shifted right with each row's last
real token (its language id) first. ``remat`` wraps each layer in ``jax.checkpoint`` when there
is no cache and no prefix.

Marian (``MarianMTModel``, ``MarianModel``) and Pegasus (``PegasusForConditionalGeneration``,
``PegasusModel``) are BART's model with a fixed sinusoidal position table per stack (no offset, no
``layernorm_embedding``; computed where a checkpoint lacks it), normalised after each sublayer
(Marian) or before it with a final ``layer_norm`` (Pegasus); with ``scale_embedding`` their stacks
scale what they embed rather than the table its lookups (the encoder its ids' embeddings, the
decoder its input embeddings, given ones too), and their bare models take ``decoder_input_ids``.
M2M100 (``M2M100ForConditionalGeneration``, ``M2M100Model``; NLLB-200's architecture) has mBART's
layers and fairseq's weightless sinusoidal positions, read at each token's count of real tokens, and
a head without ``final_logits_bias``.

A call given ``dropout_rng`` applies the config's dropouts where transformers' ``.train()`` does
(``dropout`` on the embeddings and each sublayer's output, ``attention_dropout`` on attention
probabilities, ``activation_dropout`` on the feed-forward's hidden units, ``classifier_dropout`` in
the classification head) and skips whole layers at ``encoder_layerdrop`` / ``decoder_layerdrop``;
without one the model is in eval mode. Not implemented (named in an error): ``scan_layers``.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._gemma2 import ScaledEmbed
from peftjax.models._losses import check_span_labels, masked_cross_entropy, span_outputs
from peftjax.models._modeling import Buffer, ConfigRef, PreTrainedModel
from peftjax.models._outputs import ModelOutput
from peftjax.models._seq2seq_generation import Seq2SeqGenerationMixin
from peftjax.models._encoder_decoder import (
    EncoderDecoder,
    check_ids,
    classified_at_last_eos,
    cross_attention_mask,
    last_eos,
    shift_right,
)
from peftjax.models._t5 import T5ClassificationHead
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import keep_mask, layer_key, split_keys
from peftjax.nn._scan import check_remat, checkpointed

# torch-only keys: the stacks' copies of ``shared`` (tied in transformers)
_IGNORED = (r"(model\.)?(encoder|decoder)\.embed_tokens\.weight",)
POSITION_OFFSET = 2  # transformers' BartLearnedPositionalEmbedding: position p reads row p + 2


# what sets the BART-like families apart: mBART, Pegasus and M2M100 normalise before each sublayer and
# after each stack (BART and Marian after each sublayer); Marian and Pegasus add a fixed sinusoidal
# table (no offset, no layernorm_embedding), M2M100 fairseq's weightless one at each token's count of
# real tokens; mBART's decoder input starts with each row's last real token
_PRE_NORM = ("mbart", "pegasus", "m2m_100")
_SINUSOIDAL = ("marian", "pegasus")
_NAMES = {"bart": "BART", "mbart": "mBART", "marian": "Marian", "pegasus": "Pegasus", "m2m_100": "M2M100"}
_POSITION_KEYS = (r"(model\.)?(encoder|decoder)\.embed_positions\.weight",)


def _family(config) -> str:
    return getattr(config, "model_type", "bart")


def sinusoidal_positions(num_positions: int, dim: int) -> np.ndarray:
    """transformers' Marian and Pegasus position table ``[num_positions, dim]``: position ``p``'s
    angles ``p / 10000 ** (2 * (j // 2) / dim)``, the sines of the even ones in the first half of
    the features (rounded up) and the cosines of the odd ones after them, computed in float64."""
    j = np.arange(dim)
    angles = np.arange(num_positions)[:, None] / np.power(10000, 2 * (j // 2) / dim)[None]
    half = dim // 2 + dim % 2
    out = np.empty((num_positions, dim), np.float32)
    out[:, :half] = np.sin(angles[:, 0::2])
    out[:, half:] = np.cos(angles[:, 1::2])
    return out


@functools.lru_cache(maxsize=8)
def fairseq_positions(num_positions: int, dim: int, padding_idx: int) -> np.ndarray:
    """transformers' M2M100 (fairseq's) position table, computed in float32 as torch computes it:
    row ``p`` is ``sin(p * f)`` then ``cos(p * f)`` for ``f = exp(-i * log(10000) / (dim // 2 - 1))``
    (a zero column where ``dim`` is odd); the padding index's row is zeros."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    angles = np.arange(num_positions, dtype=np.float32)[:, None] * freqs[None]
    table = np.concatenate([np.sin(angles), np.cos(angles), np.zeros((num_positions, dim % 2), np.float32)], axis=1)
    table[padding_idx] = 0
    return table.astype(np.float32)


def _check_config(config) -> None:
    name = _NAMES.get(_family(config), "BART")
    if _family(config) == "marian":
        if getattr(config, "share_encoder_decoder_embeddings", True) is False:
            raise ValueError("Marian: share_encoder_decoder_embeddings=False (separate encoder and decoder "
                             "vocabularies) is not implemented")
        if getattr(config, "decoder_vocab_size", None) not in (None, config.vocab_size):
            raise ValueError(f"Marian: decoder_vocab_size ({config.decoder_vocab_size}) other than vocab_size "
                             f"({config.vocab_size}) is not implemented")
    if getattr(config, "scan_layers", False):
        raise ValueError(f"scan_layers=True is not implemented for {name} (use scan_layers=False)")
    if config.activation_function not in ACTIVATIONS:
        raise ValueError(f"{name}: activation_function {config.activation_function!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}")
    for heads in ("encoder_attention_heads", "decoder_attention_heads"):
        if config.d_model % getattr(config, heads):
            raise ValueError(f"{name}: d_model ({config.d_model}) must be divisible by {heads} "
                             f"({getattr(config, heads)})")


def _rate(config, name: str) -> float:
    return float(getattr(config, name, 0.0) or 0.0)


def _layer_norm(config, kw) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.d_model, epsilon=1e-5, **kw)  # torch.nn.LayerNorm's default epsilon


class BartAttention(nnx.Module):
    """``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (biased); scores scaled by ``head_dim ** -0.5``."""

    def __init__(self, config, heads: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = config.d_model
        self.num_heads, self.head_dim = heads, d // heads
        self.dropout_rate = _rate(config, "attention_dropout")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, d, **kw)
        self.k_proj = nnx.Linear(d, d, **kw)
        self.v_proj = nnx.Linear(d, d, **kw)
        self.out_proj = nnx.Linear(d, d, **kw)

    def heads(self, proj, x):
        b, s, _ = x.shape
        return proj(x).reshape(b, s, self.num_heads, self.head_dim)

    def kv(self, states):
        """``(key, value)`` of ``states``: the encoder output's are computed once per input."""
        return self.heads(self.k_proj, states), self.heads(self.v_proj, states)

    def __call__(self, x, mask, kv=None, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """Attends ``x``'s queries over its own keys (``kv`` None) or over given ``(key, value)``."""
        b, s, _ = x.shape
        q = self.heads(self.q_proj, x)
        k, v = self.kv(x) if kv is None else kv
        if cache is not None:
            cache = attn.update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]
        if prefix is not None:
            k, v = attn.prepend_prefix(k, prefix[0]), attn.prepend_prefix(v, prefix[1])
        out = attn.dropped_attention(q, k, v, mask, scale=self.head_dim**-0.5, rate=self.dropout_rate,
                                     rng=dropout_rng)
        return self.out_proj(out.reshape(b, s, -1)), cache


class _Layer(nnx.Module):
    """What the encoder's and the decoder's layers share: the residual sublayers, normalised after
    (BART) or before (mBART), and the feed-forward ``fc1``/``fc2``."""

    def _init_common(self, config, ffn_dim: int, kw) -> None:
        self.pre_norm = _family(config) in _PRE_NORM
        self.dropout_rate = _rate(config, "dropout")
        self.activation_dropout = _rate(config, "activation_dropout")
        self.act = config.activation_function
        self.fc1 = nnx.Linear(config.d_model, ffn_dim, **kw)
        self.fc2 = nnx.Linear(ffn_dim, config.d_model, **kw)
        self.final_layer_norm = _layer_norm(config, kw)

    def _residual(self, x, norm, sublayer, key):
        """``x + dropout(sublayer(...))`` with ``norm`` before the sublayer (mBART) or after the sum (BART)."""
        out = x + dropout(sublayer(norm(x) if self.pre_norm else x), self.dropout_rate, key)
        return out if self.pre_norm else norm(out)

    def _feed_forward(self, x, inner_key, outer_key):
        def ffn(h):
            return self.fc2(dropout(ACTIVATIONS[self.act](self.fc1(h)), self.activation_dropout, inner_key))

        return self._residual(x, self.final_layer_norm, ffn, outer_key)


class BartEncoderLayer(_Layer):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = BartAttention(config, config.encoder_attention_heads, **kw)
        self.self_attn_layer_norm = _layer_norm(config, kw)
        self._init_common(config, config.encoder_ffn_dim, kw)

    def __call__(self, x, mask, prefix=None, dropout_rng=None):
        k_attn, k_out, k_act, k_ffn = split_keys(dropout_rng, 4)
        x = self._residual(x, self.self_attn_layer_norm,
                           lambda h: self.self_attn(h, mask, prefix=prefix, dropout_rng=k_attn)[0], k_out)
        return self._feed_forward(x, k_act, k_ffn)


class BartDecoderLayer(_Layer):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = BartAttention(config, config.decoder_attention_heads, **kw)
        self.self_attn_layer_norm = _layer_norm(config, kw)
        self.encoder_attn = BartAttention(config, config.decoder_attention_heads, **kw)
        self.encoder_attn_layer_norm = _layer_norm(config, kw)
        self._init_common(config, config.decoder_ffn_dim, kw)

    def __call__(self, x, mask, cross_kv, cross_mask, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        self_prefix, cross_prefix = (None, None) if prefix is None else prefix
        k_attn, k_out, k_cross_attn, k_cross_out, k_act, k_ffn = split_keys(dropout_rng, 6)
        new_cache = cache

        def self_attention(h):
            nonlocal new_cache
            out, new_cache = self.self_attn(h, mask, None, cache, cache_index, self_prefix, k_attn)
            return out

        x = self._residual(x, self.self_attn_layer_norm, self_attention, k_out)
        x = self._residual(x, self.encoder_attn_layer_norm,
                           lambda h: self.encoder_attn(h, cross_mask, cross_kv, prefix=cross_prefix,
                                                       dropout_rng=k_cross_attn)[0], k_cross_out)
        return self._feed_forward(x, k_act, k_ffn), new_cache


class _Stack(nnx.Module):
    """The encoder or the decoder: ``embed_positions``, ``layers``, ``layernorm_embedding`` (BART,
    mBART) and ``layer_norm`` (mBART, Pegasus); the token embedding is the model's ``shared``."""

    def __init__(self, config, *, is_decoder: bool, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        family = _family(config)
        self.padding_idx = None
        if family == "m2m_100":  # no weight: a table computed at each call, read at each token's count of real tokens
            self.position_offset, self.padding_idx = 0, int(config.pad_token_id)
            self.max_positions = int(config.max_position_embeddings)
            self.embed_positions = nnx.data(None)
            self.layernorm_embedding = nnx.data(None)
        elif family in _SINUSOIDAL:  # a frozen weight in transformers too, computed where a checkpoint lacks it
            self.position_offset = 0
            self.embed_positions = nnx.Embed(config.max_position_embeddings, config.d_model, **kw)
            self.embed_positions.embedding.set_value(
                jnp.asarray(sinusoidal_positions(config.max_position_embeddings, config.d_model), param_dtype))
            self.layernorm_embedding = nnx.data(None)
        else:
            self.position_offset = POSITION_OFFSET
            self.embed_positions = nnx.Embed(config.max_position_embeddings + POSITION_OFFSET, config.d_model, **kw)
            self.layernorm_embedding = _layer_norm(config, kw)
        layer, n = (BartDecoderLayer, config.decoder_layers) if is_decoder else (BartEncoderLayer,
                                                                                 config.encoder_layers)
        self.layers = nnx.List([layer(config, **kw) for _ in range(n)])
        self.layer_norm = _layer_norm(config, kw) if family in _PRE_NORM else nnx.data(None)
        self.is_decoder = is_decoder
        self.dropout_rate = _rate(config, "dropout")
        self.layerdrop = _rate(config, "decoder_layerdrop" if is_decoder else "encoder_layerdrop")
        self.remat = check_remat(getattr(config, "remat", "none"))

    def cross_kv(self, encoder_hidden) -> list[tuple[jax.Array, jax.Array]]:
        """Each decoder layer's cross-attention ``(key, value)`` of the encoder output."""
        return [layer.encoder_attn.kv(encoder_hidden) for layer in self.layers]

    def _fairseq_positions(self, input_ids, shape, past, total: int) -> jax.Array:
        """M2M100's position embeddings ``[b, s, d]``: a token's position is ``padding_idx`` plus its
        count of real tokens (``past`` cached ones before them), a padding token's the zero row;
        given embeddings count from ``padding_idx + 1``; ``total`` bounds the sequence's length."""
        b, s, d = shape
        table = jnp.asarray(fairseq_positions(max(self.max_positions, total) + self.padding_idx + 2, d,
                                              self.padding_idx))
        if input_ids is None:
            ids = jnp.broadcast_to(self.padding_idx + 1 + past + jnp.arange(s), (b, s))
        else:
            real = (jnp.asarray(input_ids) != self.padding_idx).astype(jnp.int32)
            ids = (jnp.cumsum(real, axis=1) + past) * real + self.padding_idx
        return table[ids]

    def __call__(self, x, key_mask, *, cross_kv=None, cross_mask=None, cache=None, cache_index=None,
                 prefix_kv=None, dropout_rng=None, input_ids=None):
        """Runs the stack on token embeddings ``x`` ``[b, s, d]``; arguments as ``T5Stack``'s
        (``input_ids``: the tokens of ``x``, which place M2M100's positions)."""
        s = x.shape[1]
        k_embed, k_blocks, k_drop = split_keys(dropout_rng, 3)
        num_prefix = 0
        if prefix_kv is not None:
            first = prefix_kv[0][0] if self.is_decoder else prefix_kv[0]
            num_prefix = first[0].shape[1]
        start = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        # transformers counts a decoder's positions from its cache's length: a prefix shifts them
        past = (num_prefix if self.is_decoder else 0) + start
        if self.embed_positions is None:
            total = num_prefix + (s if cache is None else cache[0]["k"].shape[1])
            x = x + self._fairseq_positions(input_ids, x.shape, past, total).astype(x.dtype)
        else:
            x = x + self.embed_positions(past + jnp.arange(s) + self.position_offset)[None].astype(x.dtype)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = dropout(x, self.dropout_rate, k_embed)
        key_mask = attn.prefix_key_mask(jnp.asarray(key_mask).astype(bool), num_prefix)
        mask = attn.attention_mask_4d(num_prefix + start + jnp.arange(s), key_mask, causal=self.is_decoder)
        cross = cross_attention_mask(cross_mask, prefix_kv) if self.is_decoder else None
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            prefix = None if prefix_kv is None else prefix_kv[i]
            key = layer_key(k_blocks, i)
            before = x
            if not self.is_decoder:
                if prefix is None and self.remat != "none":
                    graphdef, state = nnx.split(layer)
                    x = checkpointed(lambda st, h, k, g=graphdef: nnx.merge(g, st)(h, mask, dropout_rng=k),
                                     self.remat)(state, x, key)
                else:
                    x = layer(x, mask, prefix, key)
            elif cache is None and prefix is None and self.remat != "none":
                graphdef, state = nnx.split(layer)
                x = checkpointed(lambda st, h, kv, k, g=graphdef: nnx.merge(g, st)(h, mask, kv, cross,
                                                                                   dropout_rng=k)[0],
                                 self.remat)(state, x, cross_kv[i], key)
            else:
                x, layer_cache = layer(x, mask, cross_kv[i], cross, None if cache is None else cache[i], start,
                                       prefix, key)
                if cache is not None:
                    new_cache.append(layer_cache)
            if self.layerdrop > 0 and k_drop is not None:  # LayerDrop: the whole layer skipped at random
                x = jnp.where(keep_mask(layer_key(k_drop, i), (), 1.0 - self.layerdrop), x, before)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x, new_cache


class BartModel(EncoderDecoder, PreTrainedModel):
    """The bare encoder-decoder: ``shared``, ``encoder``, ``decoder``; returns the decoder's output.

    As transformers: the decoder's input defaults to ``input_ids`` shifted right.
    """

    base_model_prefix: ClassVar[str] = "model"  # a task model's checkpoint loads into the bare one
    shifts_input_ids: ClassVar[bool] = True
    ignored_keys: ClassVar[tuple[str, ...]] = (*_IGNORED, r"lm_head\.weight", r"final_logits_bias")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = self.config
        # BART's table scales its lookups; Marian's and Pegasus's stacks scale what they embed (the
        # encoder its ids' embeddings, the decoder its input embeddings, given ones too), as transformers'
        self.stack_scale = c.d_model**0.5 if c.scale_embedding and _family(c) in _SINUSOIDAL else None
        self.shared = (ScaledEmbed(c.vocab_size, c.d_model, embed_scale=c.d_model**0.5, **kw)
                       if c.scale_embedding and self.stack_scale is None else nnx.Embed(c.vocab_size, c.d_model, **kw))
        self.encoder = _Stack(c, is_decoder=False, **kw)
        self.decoder = _Stack(c, is_decoder=True, **kw)

    def shift_right(self, labels) -> jax.Array:
        """The decoder's input from ``labels`` (-100 as padding): transformers' ``shift_tokens_right``
        (``decoder_start_token_id`` first) or, for mBART, each row's last real token first."""
        return shift_right(labels, self.config, wrap_last=_family(self.config) == "mbart")

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, prefix_kv=None,
               dropout_rng=None) -> ModelOutput:
        """The encoder's ``last_hidden_state`` ``[b, s, d_model]`` (``dropout_rng``: training's dropout)."""
        check_ids(input_ids, inputs_embeds, "")
        x = self._scaled(self.shared(jnp.asarray(input_ids))) if inputs_embeds is None else jnp.asarray(inputs_embeds)
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], bool)
        if prefix_kv is not None:
            a = self.encoder.layers[0].self_attn
            attn.check_prefix_kv(prefix_kv, num_layers=len(self.encoder.layers), kv_heads=a.num_heads,
                                 head_dim=a.head_dim, batch=x.shape[0], owner=f"{type(self).__name__}.encoder")
        h, _ = self.encoder(x, attention_mask, prefix_kv=prefix_kv, dropout_rng=dropout_rng, input_ids=input_ids)
        return ModelOutput(last_hidden_state=h)

    def _scaled(self, x: jax.Array) -> jax.Array:
        if self.stack_scale is None:
            return x
        return x * jnp.asarray(self.stack_scale, self.shared.embedding.get_value().dtype).astype(x.dtype)

    def decoder_embeddings(self, decoder_input_ids, decoder_inputs_embeds) -> jax.Array:
        """The decoder's input embeddings (Marian's and Pegasus's scaled, given ones too)."""
        return self._scaled(super().decoder_embeddings(decoder_input_ids, decoder_inputs_embeds))

    def decoder_prefix_layout(self) -> tuple[int, int, int]:
        """``(layers, heads, head_dim)`` of the decoder's attention."""
        a = self.decoder.layers[0].self_attn
        return len(self.decoder.layers), a.num_heads, a.head_dim

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, prefix_kv=None,
                 encoder_prefix_kv=None, dropout_rng=None) -> ModelOutput:
        """``last_hidden_state`` (the decoder's) and ``encoder_last_hidden_state``."""
        h, _, enc = self.decode(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                encoder_outputs, inputs_embeds, decoder_inputs_embeds, prefix_kv=prefix_kv,
                                encoder_prefix_kv=encoder_prefix_kv, dropout_rng=dropout_rng)
        return ModelOutput(last_hidden_state=h, encoder_last_hidden_state=enc)


class _WithModel(PreTrainedModel):
    """A task model around ``model`` (a :class:`BartModel`): its encoder and decoder, reached as
    the seq2seq generation and the prompt-learning methods reach T5's."""

    base_model_prefix: ClassVar[str] = "model"
    body_class: ClassVar[type[BartModel]] = BartModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.model = self.body_class(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @property
    def decoder(self):
        return self.model.decoder

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, prefix_kv=None,
               dropout_rng=None) -> ModelOutput:
        """The encoder's output, as :meth:`BartModel.encode`."""
        return self.model.encode(input_ids, attention_mask, inputs_embeds, prefix_kv, dropout_rng)

    def shift_right(self, labels) -> jax.Array:
        return self.model.shift_right(labels)

    def decoder_prefix_layout(self) -> tuple[int, int, int]:
        return self.model.decoder_prefix_layout()


class BartForConditionalGeneration(Seq2SeqGenerationMixin, _WithModel):
    """Sequence-to-sequence LM: ``model`` (:class:`BartModel`), the tied (or own) ``lm_head`` and
    ``final_logits_bias``.

    >>> from peftjax.models import ModelConfig
    >>> config = ModelConfig("bart", vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
    ...                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
    ...                      decoder_ffn_dim=48, max_position_embeddings=64)
    >>> model = BartForConditionalGeneration.from_config(config)
    >>> out = model(input_ids=[[0, 5, 6, 7, 2]], labels=[[8, 9, 2]])
    >>> out.logits.shape, out.loss.shape
    ((1, 3, 96), ())
    >>> tokens = model.generate([[0, 5, 6, 7, 2]], max_new_tokens=4)  # up to 4 tokens, or fewer at EOS
    >>> int(tokens[0, 0]), tokens.shape[1] <= 5  # decoder_start_token_id first
    (2, True)
    """

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"final_logits_bias": ("final_logits_bias", False)}
    zeroed_keys: ClassVar[tuple[str, ...]] = (r"final_logits_bias",)  # a bare BartModel's checkpoint lacks it
    has_logits_bias: ClassVar[bool] = True  # M2M100's head has none
    ignored_keys: ClassVar[tuple[str, ...]] = _IGNORED

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c = self.config
        self.lm_head = nnx.data(None)
        if getattr(c, "tie_word_embeddings", True) is False:
            self.lm_head = nnx.Linear(c.d_model, c.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        # a buffer in transformers: read and written with the checkpoint, never trained nor counted
        self.final_logits_bias = (Buffer(jnp.zeros((1, c.vocab_size), param_dtype)) if self.has_logits_bias
                                  else nnx.data(None))

    def _tied(self, key: str) -> bool:
        return self.lm_head is None and key == "lm_head.weight"

    def init_cache(self, batch: int, max_len: int, dtype=None):
        n, heads, head_dim = self.decoder_prefix_layout()
        return attn.init_kv_cache(n, batch, max_len, heads, head_dim, dtype or self.dtype)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_outputs=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None, cache=None,
                 cache_index=None, cross_kv=None, prefix_kv=None, encoder_prefix_kv=None,
                 dropout_rng=None) -> ModelOutput:
        """Encodes (unless ``encoder_outputs`` is given) and decodes; arguments as
        :meth:`T5ForConditionalGeneration.__call__` (``labels`` shifted right are the decoder's
        default input, -100 ignored in the loss)."""
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.shift_right(labels)
        h, new_cache, enc = self.model.decode(
            input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs, inputs_embeds,
            decoder_inputs_embeds, cache, cache_index, cross_kv, prefix_kv, encoder_prefix_kv, dropout_rng)
        logits = self.model.shared.attend(h) if self.lm_head is None else self.lm_head(h)
        if self.final_logits_bias is not None:
            logits = logits + self.final_logits_bias.get_value().astype(logits.dtype)[None]
        loss = None if labels is None else masked_cross_entropy(logits, jnp.asarray(labels))
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h, past_key_values=new_cache,
                           encoder_last_hidden_state=enc)


class BartForSequenceClassification(_WithModel):
    """``model`` and a ``classification_head`` (``dense``, tanh, ``out_proj``) read at each row's
    last EOS of the decoder's output, as transformers' (every row must hold as many EOS tokens)."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"classification_head\.(dense|out_proj)\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*_IGNORED, r"lm_head\.weight", r"final_logits_bias")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.classification_head = T5ClassificationHead(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 labels=None, inputs_embeds=None, decoder_inputs_embeds=None, dropout_rng=None) -> ModelOutput:
        """Classifies a batch; ``labels`` (``[batch]`` ints, or floats for regression) add the loss.

        Raises:
          ValueError: ``input_ids`` is missing (it locates the EOS tokens), or (outside ``jit``) the
            rows differ in their number of EOS tokens.
        """
        last = last_eos(input_ids, self.config, type(self).__name__)
        body_key, head_key = split_keys(dropout_rng, 2)
        out = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                         inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_inputs_embeds, dropout_rng=body_key)
        return classified_at_last_eos(self.classification_head, out, last, labels, self.config, head_key)


class BartForQuestionAnswering(_WithModel):
    """Extractive question answering (PEFT's ``QUESTION_ANS``): ``model`` fed ``input_ids`` shifted
    right as the decoder's input unless given one, and a biased ``qa_outputs`` giving every decoder
    position a start and an end logit, as transformers'."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"qa_outputs\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*_IGNORED, r"lm_head\.weight", r"final_logits_bias")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if getattr(config, "num_labels", 2) != 2:  # transformers' class sets 2 (BART's configs say 3)
            config = copy.deepcopy(config.hf_config if isinstance(config, ConfigRef) else config)
            config.num_labels = 2
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        check_span_labels(self, self.config)
        self.qa_outputs = nnx.Linear(self.config.d_model, 2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                 encoder_outputs=None, start_positions=None, end_positions=None, inputs_embeds=None,
                 decoder_inputs_embeds=None, prefix_kv=None, encoder_prefix_kv=None, dropout_rng=None) -> ModelOutput:
        """``start_logits`` and ``end_logits``, ``[batch, decoder seq]``; ``start_positions`` and
        ``end_positions`` (``[batch]`` token indices) add transformers' span loss."""
        out = self.model(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                         inputs_embeds, decoder_inputs_embeds, prefix_kv, encoder_prefix_kv, dropout_rng)
        logits = self.qa_outputs(out.last_hidden_state)
        return ModelOutput(**span_outputs(logits, start_positions, end_positions),
                           encoder_last_hidden_state=out.encoder_last_hidden_state)


class MBartModel(BartModel):
    """mBART's bare encoder-decoder: BART's, normalised before each sublayer, with a final
    ``layer_norm`` per stack; the decoder's default input wraps each row's last real token first."""


class _MBart:
    body_class: ClassVar[type[BartModel]] = MBartModel


class MBartForConditionalGeneration(_MBart, BartForConditionalGeneration):
    """mBART's sequence-to-sequence LM (see :class:`MBartModel`)."""


class MBartForSequenceClassification(_MBart, BartForSequenceClassification):
    """mBART's sequence classifier (see :class:`MBartModel`)."""


class MBartForQuestionAnswering(_MBart, BartForQuestionAnswering):
    """mBART's question answering (see :class:`MBartModel`)."""


class _SinusoidalPositions:
    """Marian's and Pegasus's position tables: read where a checkpoint holds them (Pegasus's do),
    computed where it does not (transformers never saves Marian's)."""

    computed_keys: ClassVar[tuple[str, ...]] = _POSITION_KEYS

    def computed_value(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        return sinusoidal_positions(*shape)


class MarianModel(_SinusoidalPositions, BartModel):
    """Marian's bare encoder-decoder (Helsinki-NLP's opus-mt): BART's, normalised after each
    sublayer, with sinusoidal positions and no ``layernorm_embedding``; as transformers', it takes
    ``decoder_input_ids`` (it does not shift ``input_ids`` into its decoder)."""

    shifts_input_ids: ClassVar[bool] = False


class _Marian(_SinusoidalPositions):
    body_class: ClassVar[type[BartModel]] = MarianModel


class MarianMTModel(_Marian, BartForConditionalGeneration):
    """Marian's translation model (see :class:`MarianModel`): the tied head plus ``final_logits_bias``."""


class PegasusModel(_SinusoidalPositions, BartModel):
    """Pegasus's bare encoder-decoder: mBART's pre-norm layers and final ``layer_norm`` per stack,
    with sinusoidal positions and no ``layernorm_embedding``; it takes ``decoder_input_ids``, as
    Marian's."""

    shifts_input_ids: ClassVar[bool] = False


class _Pegasus(_SinusoidalPositions):
    body_class: ClassVar[type[BartModel]] = PegasusModel


class PegasusForConditionalGeneration(_Pegasus, BartForConditionalGeneration):
    """Pegasus's summarisation model (see :class:`PegasusModel`)."""


class M2M100Model(BartModel):
    """M2M100's bare encoder-decoder (NLLB-200's too): mBART's pre-norm layers and final
    ``layer_norm`` per stack with fairseq's sinusoidal positions, which have no weight: each token
    is placed at ``pad_token_id`` plus its count of real tokens (padding at the zero row), wherever
    the padding is; no ``layernorm_embedding``; it takes ``decoder_input_ids``, as transformers'."""

    shifts_input_ids: ClassVar[bool] = False


class M2M100ForConditionalGeneration(BartForConditionalGeneration):
    """M2M100's and NLLB-200's translation model (see :class:`M2M100Model`): the tied head, without
    a ``final_logits_bias``; a target language is the decoder's forced first token
    (``forced_bos_token_id``), as transformers' ``generate`` takes it."""

    body_class: ClassVar[type[BartModel]] = M2M100Model
    has_logits_bias: ClassVar[bool] = False
    ignored_keys: ClassVar[tuple[str, ...]] = (*_IGNORED, r"(model\.)?(encoder|decoder)\.embed_positions\.weights")


register(BartForConditionalGeneration, model_types=("bart",), default=True)
register(M2M100ForConditionalGeneration, model_types=("m2m_100",), default=True)
register(MarianMTModel, model_types=("marian",), default=True)
register(PegasusForConditionalGeneration, model_types=("pegasus",), default=True)
register(MBartForConditionalGeneration, model_types=("mbart",), default=True)
for _cls in (BartModel, BartForSequenceClassification, BartForQuestionAnswering, MBartModel,
             MBartForSequenceClassification, MBartForQuestionAnswering, MarianModel, PegasusModel, M2M100Model):
    register(_cls)
