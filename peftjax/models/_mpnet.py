"""MPNet encoders in Flax NNX, with transformers' module names (all-mpnet-base-v2 and its kin).

RoBERTa's model (``peftjax.models._roberta``: fairseq's positions, its classification and masked-LM
heads) with MPNet's pieces: embeddings without token types (positions counted after padding index
1, whatever the pad token), attention ``attention.attn.q``/``k``/``v``/``o`` with a relative
position bias (``encoder.relative_attention_bias``: T5's 32 bidirectional buckets up to distance
128, one bias per head, shared by every layer) added to the scaled scores, and ``attention.LayerNorm``
after it. The bias counts columns of the row, as transformers' does (padding included), so within a
packed sequence it is the unpacked one's.

transformers' MPNet takes no cache, so a prefix (prefix tuning) is refused by name: PEFT's would be
ignored there.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._bert import BertIntermediate, BertOutput, _layer_norm, linear_kw, pick_rows
from peftjax.models._dropout import dropout
from peftjax.models._roberta import (
    RobertaForMaskedLM,
    RobertaForMultipleChoice,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)
from peftjax.models._t5 import relative_position_bucket
from peftjax.nn._dropout import split_keys
from peftjax.nn._functional import softmax
from peftjax.nn._scan import check_remat, make_layers, run_layer, run_layers

PADDING_IDX = 1  # transformers' MPNetEmbeddings: positions start after 1, whatever pad_token_id says
NUM_BUCKETS, MAX_DISTANCE = 32, 128  # transformers' compute_position_bias and relative_position_bucket
IGNORED_KEYS = (r"(mpnet\.)?embeddings\.position_ids", r"lm_head\..*")


class MPNetEmbeddings(nnx.Module):
    """``word_embeddings``, ``position_embeddings``, ``LayerNorm``; no token types."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs, width: int | None = None):
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, embedding_init=init)
        h = config.hidden_size
        self.word_embeddings = nnx.Embed(config.vocab_size, h, **kw)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, h, **kw)
        self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = float(config.hidden_dropout_prob)

    def __call__(self, inputs_embeds, token_type_ids, position_ids, rng=None):
        del token_type_ids  # MPNet has none (a tokenizer's are ignored)
        x = inputs_embeds + self.position_embeddings(position_ids)
        return dropout(self.LayerNorm(x), self.dropout_rate, rng)


class MPNetSelfAttention(nnx.Module):
    """``q``, ``k``, ``v``, ``o`` (biased); scores scaled by ``head_dim ** -0.5`` plus the position bias."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        kw = linear_kw(config, dtype, param_dtype, rngs)
        h = config.hidden_size
        self.q = nnx.Linear(h, h, **kw)
        self.k = nnx.Linear(h, h, **kw)
        self.v = nnx.Linear(h, h, **kw)
        self.o = nnx.Linear(h, h, **kw)
        self.dropout_rate = float(config.attention_probs_dropout_prob)

    def _heads(self, proj, x):
        return proj(x).reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(self, x, mask, bias, rng=None, rows=None, x_rows=None):
        """``[batch, seq, hidden]``; with ``rows`` (flat indices) and ``x_rows`` (``x`` there) the
        output of those queries only, ``[n, hidden]`` (as ``BertSelfAttention``'s)."""
        b, s, _ = x.shape
        k, v = self._heads(self.k, x), self._heads(self.v, x)
        if rows is not None:
            return self._attend_rows(x_rows, k, v, mask, bias, rng, rows, s)
        out = attn.dropped_attention(self._heads(self.q, x), k, v, mask, scale=self.head_dim**-0.5, bias=bias,
                                     rate=self.dropout_rate, rng=rng)
        return self.o(out.reshape(b, s, -1))

    def _attend_rows(self, x_rows, k, v, mask, bias, rng, rows, s):
        """The kept queries against every key of the batch, other rows' masked (``BertSelfAttention``'s way)."""
        b = k.shape[0]
        q = self._heads(self.q, x_rows)  # [n, heads, head_dim]
        k, v = k.reshape(b * s, self.num_heads, self.head_dim), v.reshape(b * s, self.num_heads, self.head_dim)
        row, column = rows // s, rows % s
        own = jnp.broadcast_to(mask, (b, 1, s, s))[row, 0, column]  # [n, keys]
        keep = ((jnp.arange(b * s) // s)[None, :] == row[:, None]) & jnp.tile(own, (1, b))
        query_bias = jnp.tile(bias[0][:, column].transpose(1, 0, 2), (1, 1, b))  # [n, heads, batch * keys]
        scores = jnp.einsum("nhd,khd->nhk", q, k).astype(jnp.float32) * self.head_dim**-0.5 + query_bias
        scores = jnp.where(keep[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = dropout(softmax(scores, axis=-1).astype(v.dtype), self.dropout_rate, rng)
        return self.o(jnp.einsum("nhk,khd->nhd", probs, v).reshape(rows.shape[0], -1))


class MPNetAttention(nnx.Module):
    """``attn`` then ``LayerNorm(dropout(out) + x)``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.attn = MPNetSelfAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = float(config.hidden_dropout_prob)

    def __call__(self, x, mask, bias, rng=None, rows=None):
        attn_rng, out_rng = split_keys(rng, 2)
        if rows is None:
            return self.LayerNorm(dropout(self.attn(x, mask, bias, attn_rng), self.dropout_rate, out_rng) + x)
        x_rows = pick_rows(x.reshape(-1, x.shape[-1]), rows)
        out = self.attn(x, mask, bias, attn_rng, rows, x_rows)
        return self.LayerNorm(dropout(out, self.dropout_rate, out_rng) + x_rows)


class MPNetLayer(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = MPNetAttention(config, **kw)
        self.intermediate = BertIntermediate(config, **kw)
        self.output = BertOutput(config, **kw)

    def __call__(self, x, mask, bias, rng=None, rows=None):
        attn_rng, out_rng = split_keys(rng, 2)
        a = self.attention(x, mask, bias, attn_rng, rows)
        return self.output(self.intermediate(a), a, out_rng)


class MPNetEncoder(nnx.Module):
    """``layer`` and the ``relative_attention_bias`` they share."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.remat = check_remat(getattr(config, "remat", "none"))
        self.layer = make_layers(
            config, lambda _, r: MPNetLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r), rngs=rngs)
        init = nnx.initializers.normal(config.initializer_range)
        self.relative_attention_bias = nnx.Embed(config.relative_attention_num_buckets, config.num_attention_heads,
                                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs, embedding_init=init)

    def position_bias(self, s: int) -> jax.Array:
        """``[1, heads, s, s]``: each head's bias for a query and a key ``key - query`` columns apart."""
        positions = jnp.arange(s)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], bidirectional=True,
                                           num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE)
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None].astype(jnp.float32)

    def __call__(self, x, mask, rng=None, prefix_kv=None, rows=None):
        """``BertEncoder``'s call (``prefix_kv`` must be ``None``: see the module docstring)."""
        del prefix_kv  # refused by MPNetModel
        bias = self.position_bias(x.shape[1])
        if rows is None:
            return run_layers(self.layer, lambda layer, h, k: layer(h, mask, bias, k), x, self.remat, rng)
        last = len(self.layer) - 1
        x = run_layers(self.layer, lambda layer, h, k: layer(h, mask, bias, k), x, self.remat, rng, stop=last)
        return run_layer(self.layer, last, lambda layer, h, k: layer(h, mask, bias, k, rows=rows), x, self.remat,
                         rng)


class MPNetModel(RobertaModel):
    """The MPNet encoder: ``embeddings``, ``encoder`` (``layer``, ``relative_attention_bias``) and the
    ``pooler`` unless dropped.

    >>> from peftjax.models import ModelConfig
    >>> config = ModelConfig("mpnet", vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                      intermediate_size=37, max_position_embeddings=40)
    >>> model = MPNetModel.from_config(config)
    >>> model(input_ids=[[0, 5, 7, 2, 1]], attention_mask=[[1, 1, 1, 1, 0]]).last_hidden_state.shape
    (1, 5, 32)
    """

    base_model_prefix: ClassVar[str] = "mpnet"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    embeddings_class: ClassVar[type[nnx.Module]] = MPNetEmbeddings
    encoder_class: ClassVar[type[nnx.Module]] = MPNetEncoder
    padding_idx: ClassVar[int] = PADDING_IDX

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng, prefix_kv,
                segment_ids, segment_starts, *, first_only: bool):
        if prefix_kv is not None:
            raise ValueError(f"{type(self).__name__} takes no prefix_kv: transformers' MPNet has no cache, so "
                             "prefix tuning has no meaning there (PEFT's would be ignored); use prompt tuning, "
                             "P-tuning or LoRA")
        return super()._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                               None, segment_ids, segment_starts, first_only=first_only)


class MPNetForSequenceClassification(RobertaForSequenceClassification):
    """``mpnet`` (without a pooler) and the ``classifier`` head (RoBERTa's) on each row's first token."""

    base_model_prefix: ClassVar[str] = "mpnet"
    ignored_keys: ClassVar[tuple[str, ...]] = (*IGNORED_KEYS, r"(mpnet\.)?pooler\..*")
    backbone_class: ClassVar[type[RobertaModel]] = MPNetModel


class MPNetForTokenClassification(RobertaForTokenClassification):
    """``mpnet`` (without a pooler), dropout, and a linear ``classifier`` on every token."""

    base_model_prefix: ClassVar[str] = "mpnet"
    ignored_keys: ClassVar[tuple[str, ...]] = (*IGNORED_KEYS, r"(mpnet\.)?pooler\..*")
    backbone_class: ClassVar[type[RobertaModel]] = MPNetModel


class MPNetForQuestionAnswering(RobertaForQuestionAnswering):
    """``mpnet`` (without a pooler) and a linear ``qa_outputs``: a start and an end logit per token."""

    base_model_prefix: ClassVar[str] = "mpnet"
    ignored_keys: ClassVar[tuple[str, ...]] = (*IGNORED_KEYS, r"(mpnet\.)?pooler\..*")
    backbone_class: ClassVar[type[RobertaModel]] = MPNetModel


class MPNetForMultipleChoice(RobertaForMultipleChoice):
    """``mpnet`` (with its pooler), dropout, and a linear ``classifier`` scoring each choice."""

    base_model_prefix: ClassVar[str] = "mpnet"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    backbone_class: ClassVar[type[RobertaModel]] = MPNetModel


class MPNetForMaskedLM(RobertaForMaskedLM):
    """Masked language modelling: ``mpnet`` (without a pooler) and RoBERTa's ``lm_head``."""

    base_model_prefix: ClassVar[str] = "mpnet"
    ignored_keys: ClassVar[tuple[str, ...]] = (r"(mpnet\.)?embeddings\.position_ids", r"(mpnet\.)?pooler\..*")
    backbone_class: ClassVar[type[RobertaModel]] = MPNetModel

    def head(self, h: jax.Array) -> jax.Array:
        return self.lm_head(h, self.mpnet.embeddings.word_embeddings)


register(MPNetModel, model_types=("mpnet",), default=True)
for _cls in (MPNetForSequenceClassification, MPNetForTokenClassification, MPNetForQuestionAnswering,
             MPNetForMultipleChoice, MPNetForMaskedLM):
    register(_cls)
