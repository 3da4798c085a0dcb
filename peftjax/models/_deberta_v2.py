"""DeBERTa-v2 and DeBERTa-v3 (``model_type`` ``"deberta-v2"``), and DeBERTa (v1, ``"deberta"``), in Flax
NNX with transformers' module names. v1 is v2 without buckets, convolution or shared keys, its
attention one fused ``in_proj`` (per head: query, key, value) plus ``q_bias``/``v_bias`` and its
relative projections ``pos_proj``/``pos_q_proj`` (:class:`DebertaV1SelfAttention`); what follows
holds for both.

BERT's post-LayerNorm layers with disentangled attention: besides content-to-content scores, each
query reads the keys' relative positions (``c2p``) and each key the query's (``p2c``), through
one table of relative-position embeddings (``encoder.rel_embeddings``) shared by every layer:

- a relative distance ``i - j`` goes to a log bucket (``position_buckets`` of them, distances past
  half of them compressed up to ``max_relative_positions``), then indexes ``2 * span`` rows of the
  table (``span``: the buckets, else ``max_relative_positions``, else ``max_position_embeddings``);
- ``share_att_key`` (DeBERTa-v3) projects the table with the layer's own ``query_proj`` and
  ``key_proj`` (so an adapter on them sees the table too, as in PEFT); otherwise
  ``pos_key_proj`` / ``pos_query_proj``; ``norm_rel_ebd="layer_norm"`` normalises the table first;
- every score is divided by ``sqrt(head_dim * (1 + the number of pos_att_type entries))``;
- queries and keys are both masked: a padding row attends evenly to every key, as transformers'
  (its output is padding's, read by nothing);
- embeddings: ``word_embeddings`` (``embedding_size`` wide, projected by ``embed_proj`` when it
  is not ``hidden_size``), absolute positions only with ``position_biased_input`` (false in v3),
  token types only with ``type_vocab_size > 0``; padding zeroed after the LayerNorm;
- ``conv_kernel_size`` (DeBERTa-v2-xlarge): a grouped 1-D convolution over the embeddings joins
  the first layer's output (``encoder.conv``);
- the sequence classifier reads ``[CLS]`` through ``pooler`` (dropout, ``dense``,
  ``pooler_hidden_act``), then dropout (``cls_dropout``) and ``classifier``. The Hub's checkpoints
  (masked LMs) carry no pooler: it is new, as in transformers, so train and save it
  (``modules_to_save=["pooler"]``: PEFT's ``SEQ_CLS`` adds only ``classifier``).

Dropout (embeddings, the relative table, attention probabilities and outputs, pooler, classifier)
runs only with a ``dropout_rng`` key, as torch's ``.train()``.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._losses import check_span_labels, sequence_classification_loss, span_outputs, token_labels_loss
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._multiple_choice import MultipleChoice
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import ACTIVATIONS
from peftjax.models._bert import (
    BertIntermediate,
    BertOutput,
    BertSelfOutput,
    MaskedLMHead,
    check_tied_decoder,
    linear_kw,
    pick_rows,
)
from peftjax.nn._dropout import split_keys
from peftjax.nn._functional import softmax
from peftjax.nn._positions import every_position_required
from peftjax.nn._scan import check_remat, make_layers, run_layer, run_layers

POSITION_ATTENTION = ("c2p", "p2c")
REL_NORMS = ("none", "layer_norm")


def position_attention(config) -> tuple[str, ...]:
    """``pos_att_type`` as a tuple (transformers 4's ``"p2c|c2p"`` strings included)."""
    kinds = config.pos_att_type or ()
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.lower().split("|")]
    return tuple(kinds)


def check_config(config) -> None:
    """Refuses, by field, what this implementation does not compute.

    Raises:
      ValueError: an unknown activation, ``pos_att_type`` or ``norm_rel_ebd`` entry, a hidden
        size the heads (or the convolution's groups) do not divide.
    """
    family = getattr(config, "model_type", None) or "deberta-v2"
    if getattr(config, "talking_head", False):  # DeBERTa v1's option, off in its releases
        raise ValueError(f"{family}: talking_head=True (head_logits_proj, head_weights_proj) is not supported")
    acts = {"hidden_act": config.hidden_act, "pooler_hidden_act": getattr(config, "pooler_hidden_act", "gelu")}
    if getattr(config, "conv_kernel_size", 0) > 0:
        acts["conv_act"] = getattr(config, "conv_act", "tanh")
    for field, act in acts.items():
        if act not in ACTIVATIONS:
            raise ValueError(f"{family}: {field} {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    unknown = sorted(set(position_attention(config)) - set(POSITION_ATTENTION))
    if unknown:
        raise ValueError(f"{family}: pos_att_type {unknown} is not supported; supported: {list(POSITION_ATTENTION)}")
    norms = [x.strip() for x in str(getattr(config, "norm_rel_ebd", "none")).lower().split("|")]
    if sorted(set(norms) - set(REL_NORMS)):
        raise ValueError(f"deberta-v2: norm_rel_ebd {getattr(config, 'norm_rel_ebd')!r} is not supported; "
                         f"supported: {list(REL_NORMS)}")
    if not getattr(config, "attention_head_size", None) and config.hidden_size % config.num_attention_heads:
        raise ValueError(f"deberta-v2: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")
    groups = getattr(config, "conv_groups", 1)
    if getattr(config, "conv_kernel_size", 0) > 0 and config.hidden_size % groups:
        raise ValueError(f"deberta-v2: hidden_size {config.hidden_size} is not a multiple of conv_groups {groups}")


def relative_span(config) -> tuple[int, int, int]:
    """``(position_buckets, max_relative_positions, span)``: the bucketing and the table's half size."""
    buckets = getattr(config, "position_buckets", -1)
    max_relative = getattr(config, "max_relative_positions", -1)
    if max_relative < 1:
        max_relative = config.max_position_embeddings
    return buckets, max_relative, buckets if buckets > 0 else max_relative


def log_bucket(distance: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
    """Relative distances to DeBERTa's log buckets: those within ``buckets // 2`` stay as they
    are; longer ones shrink logarithmically up to ``max_position``. Float32, as transformers
    computes them, so the ceilings land where its do."""
    mid = buckets // 2
    sign = np.sign(distance)
    far = np.where((distance < mid) & (distance > -mid), mid - 1, np.abs(distance))
    ratio = np.log(far.astype(np.float32) / np.float32(mid)) / np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(far <= mid, distance.astype(np.float32), log_pos * sign).astype(np.int64)


def relative_index(length: int, buckets: int, max_position: int, span: int) -> np.ndarray:
    """``[length, length]`` rows of the ``2 * span`` relative table for query ``i`` and key ``j``:
    ``clip(bucket(i - j) + span)``. The ``p2c`` scores read the same rows (the buckets are odd in
    the distance), so one index serves both; a constant of the sequence length, and a function of
    ``i - j`` alone (:func:`distance_rows`)."""
    distance = np.arange(length)[:, None] - np.arange(length)[None, :]
    if buckets > 0 and max_position > 0:
        distance = log_bucket(distance, buckets, max_position)
    return np.clip(distance + span, 0, 2 * span - 1).astype(np.int32)


def distance_rows(index: np.ndarray) -> np.ndarray:
    """``[2s - 1]``: the table row of each distance ``i - j = k - (s - 1)`` of an ``[s, s]``
    :func:`relative_index` (which depends on the distance alone)."""
    return np.concatenate([index[0, ::-1], index[1:, 0]])  # distances -(s-1) .. 0, then 1 .. s-1


def shift_to_keys(m: jax.Array) -> jax.Array:
    """``out[..., i, j] = m[..., i, (s - 1) - i + j]`` of ``m`` ``[..., s, 2s - 1]``: each row's
    window of ``s`` columns starting ``s - 1 - i`` in, by a flat slice and a reshape (the
    relative shift of Transformer-XL), so neither direction gathers or scatters."""
    s = m.shape[-2]
    if s == 1:
        return m
    flat = m.reshape(*m.shape[:-2], s * (2 * s - 1))[..., s - 1 : s - 1 + s * (2 * s - 2)]
    return flat.reshape(*m.shape[:-2], s, 2 * s - 2)[..., :s]


def _norm(config, width, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _embed(config, n, width, dtype, param_dtype, rngs) -> nnx.Embed:
    return nnx.Embed(n, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                     embedding_init=nnx.initializers.normal(config.initializer_range))


class DebertaV2Embeddings(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h = getattr(config, "embedding_size", None) or config.hidden_size, config.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = _embed(config, config.vocab_size, e, **kw)
        self.position_embeddings = nnx.data(None)
        if getattr(config, "position_biased_input", True):
            self.position_embeddings = _embed(config, config.max_position_embeddings, e, **kw)
        self.token_type_embeddings = nnx.data(None)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = _embed(config, config.type_vocab_size, e, **kw)
        self.embed_proj = nnx.data(None)
        if e != h:
            self.embed_proj = nnx.Linear(e, h, use_bias=False, **linear_kw(config, dtype, param_dtype, rngs))
        self.LayerNorm = _norm(config, h, **kw)
        self.rate = float(config.hidden_dropout_prob)

    def __call__(self, inputs_embeds, token_type_ids, position_ids, mask, rng=None):
        x = inputs_embeds
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x) * mask[..., None].astype(x.dtype)
        return dropout(x, self.rate, rng)


class DisentangledSelfAttention(nnx.Module):
    """DeBERTa-v2's: ``query_proj``, ``key_proj``, ``value_proj``, and for the relative scores the
    layer's own key and query projections (``share_att_key``) or ``pos_key_proj`` / ``pos_query_proj``.
    A subclass changes the projections alone (:meth:`_build`, :meth:`_qkv`, :meth:`_q`, :meth:`_kv`,
    :meth:`_position_projections`): DeBERTa v1's fused ``in_proj``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = getattr(config, "attention_head_size", None) or h // self.num_heads
        self.kinds = position_attention(config)
        self.relative = bool(getattr(config, "relative_attention", False))
        self._build(config, h, self.num_heads * self.head_dim, linear_kw(config, dtype, param_dtype, rngs))
        # transformers counts pos_att_type in the scale even without relative attention
        self.scale = float(np.sqrt(np.float32(self.head_dim) * (1 + len(self.kinds))))
        self.rate = float(config.attention_probs_dropout_prob)
        self.pos_rate = float(config.hidden_dropout_prob)

    def _build(self, config, h: int, inner: int, kw: dict) -> None:
        self.query_proj = nnx.Linear(h, inner, **kw)
        self.key_proj = nnx.Linear(h, inner, **kw)
        self.value_proj = nnx.Linear(h, inner, **kw)
        self.share_att_key = bool(getattr(config, "share_att_key", False))
        self.pos_key_proj = nnx.data(None)
        self.pos_query_proj = nnx.data(None)
        if self.relative and not self.share_att_key:
            if "c2p" in self.kinds:
                self.pos_key_proj = nnx.Linear(h, inner, **kw)
            if "p2c" in self.kinds:
                self.pos_query_proj = nnx.Linear(h, inner, **kw)

    def _qkv(self, x):
        """Queries, keys and values of ``x``, ``[..., heads, head_dim]`` each."""
        return tuple(self._heads(p(x)) for p in (self.query_proj, self.key_proj, self.value_proj))

    def _q(self, x):
        return self._heads(self.query_proj(x))

    def _kv(self, x):
        return self._heads(self.key_proj(x)), self._heads(self.value_proj(x))

    def _position_projections(self):
        """The projections of the relative table into position keys (``c2p``) and queries (``p2c``)."""
        if self.share_att_key:
            return self.key_proj, self.query_proj
        return self.pos_key_proj, self.pos_query_proj

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def _projected_table(self, rel_embeddings, rng):
        """The relative table (after its dropout) as position keys for ``c2p`` and position
        queries for ``p2c``, ``[rows, heads, head_dim]`` each (``None`` where not used), through
        :meth:`_position_projections`."""
        rel = dropout(rel_embeddings, self.pos_rate, rng)
        keys, queries = self._position_projections()
        return (self._heads(keys(rel)) if "c2p" in self.kinds else None,
                self._heads(queries(rel)) if "p2c" in self.kinds else None)

    def __call__(self, x, mask, rel_embeddings=None, rel_index=None, rng=None, rows=None, x_rows=None):
        """``[batch, seq, inner]``; with ``rows`` (``[n]`` flat indices ``row * seq + column``) and
        ``x_rows`` (``x`` there, ``[n, hidden]``) the output of those queries only, ``[n, inner]``."""
        if rows is not None:
            return self._attend_rows(x, mask, rel_embeddings, rel_index, rng, rows, x_rows)
        q, k, v = self._qkv(x)
        probs_rng, pos_rng = split_keys(rng, 2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / self.scale
        if self.relative:
            pos_k, pos_q = self._projected_table(rel_embeddings, pos_rng)
            # a score's relative row depends on i - j alone: the table's row of each distance
            # -(s-1) .. s-1, then shifted into place (no gather over the scores, none in the backward)
            by_distance = distance_rows(np.asarray(rel_index))
            if pos_k is not None:  # c2p: each query against its keys' relative rows
                c2p = jnp.einsum("bqhd,rhd->bhqr", q, pos_k[by_distance]).astype(jnp.float32)
                scores = scores + shift_to_keys(c2p[..., ::-1]) / self.scale
            if pos_q is not None:  # p2c: each key against its query's relative row
                p2c = jnp.einsum("bkhd,rhd->bhkr", k, pos_q[by_distance]).astype(jnp.float32)
                scores = scores + jnp.swapaxes(shift_to_keys(p2c), -1, -2) / self.scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = dropout(softmax(scores, axis=-1).astype(v.dtype), self.rate, probs_rng)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:-1], -1)

    def _attend_rows(self, x, mask, rel_embeddings, rel_index, rng, rows, x_rows):
        """The kept queries against their own row's keys: the row's keys and values picked by
        one-hot products (their gradient a product, not a scatter), each key's relative row of
        the projected table by the query's column."""
        b, s = x.shape[:2]
        probs_rng, pos_rng = split_keys(rng, 2)
        row, column = rows // s, rows % s
        own = (row[:, None] == jnp.arange(b)[None, :]).astype(x.dtype)  # [n, batch]
        q = self._q(x_rows)  # [n, heads, d]
        k, v = (jnp.einsum("nb,bshd->nshd", own, t) for t in self._kv(x))
        scores = jnp.einsum("nhd,nkhd->nhk", q, k).astype(jnp.float32) / self.scale
        if self.relative:
            pos_k, pos_q = self._projected_table(rel_embeddings, pos_rng)
            index = jnp.asarray(rel_index)[column]  # [n, keys]: each key's relative row for this query
            if pos_k is not None:
                c2p = jnp.einsum("nhd,rhd->nhr", q, pos_k).astype(jnp.float32)
                scores = scores + jnp.take_along_axis(c2p, index[:, None, :], axis=-1) / self.scale
            if pos_q is not None:
                p2c = jnp.einsum("nkhd,nkhd->nhk", k, pos_q[index]).astype(jnp.float32)
                scores = scores + p2c / self.scale
        keep = jnp.broadcast_to(mask, (b, 1, s, s))[row, 0, column]  # [n, keys]: each query's mask row
        scores = jnp.where(keep[:, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = dropout(softmax(scores, axis=-1).astype(v.dtype), self.rate, probs_rng)
        return jnp.einsum("nhk,nkhd->nhd", probs, v).reshape(rows.shape[0], -1)


class DebertaV1SelfAttention(DisentangledSelfAttention):
    """DeBERTa (v1)'s projections: one bias-free ``in_proj`` to ``3 * inner`` whose output splits per
    head into query, key and value (``[..., heads, 3 * head_dim]``), ``q_bias`` and ``v_bias`` added
    to the queries and values; the relative table through ``pos_proj`` (keys, no bias) and
    ``pos_q_proj`` (queries). PEFT's LoRA target for this family is ``in_proj``."""

    hf_param_map: ClassVar[dict] = {"q_bias": ("q_bias", False), "v_bias": ("v_bias", False)}

    def _build(self, config, h: int, inner: int, kw: dict) -> None:
        self.in_proj = nnx.Linear(h, 3 * inner, **{**kw, "use_bias": False})
        self.q_bias = nnx.Param(jnp.zeros((inner,), kw["param_dtype"]))
        self.v_bias = nnx.Param(jnp.zeros((inner,), kw["param_dtype"]))
        self.pos_proj = nnx.data(None)
        self.pos_q_proj = nnx.data(None)
        if self.relative and "c2p" in self.kinds:
            self.pos_proj = nnx.Linear(h, inner, **{**kw, "use_bias": False})
        if self.relative and "p2c" in self.kinds:
            self.pos_q_proj = nnx.Linear(h, inner, **kw)

    def _bias(self, param, like):
        b = self._heads(param.get_value().astype(like.dtype))  # [heads, head_dim]
        return b.reshape((1,) * (like.ndim - 2) + b.shape)

    def _qkv(self, x):
        q, k, v = jnp.split(self._heads3(self.in_proj(x)), 3, axis=-1)
        return q + self._bias(self.q_bias, q), k, v + self._bias(self.v_bias, v)

    def _q(self, x):
        return self._qkv(x)[0]

    def _kv(self, x):
        return self._qkv(x)[1:]

    def _heads3(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, 3 * self.head_dim)

    def _position_projections(self):
        return self.pos_proj, self.pos_q_proj


class DebertaV2Attention(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        v1 = getattr(config, "model_type", None) == "deberta"
        self.self = (DebertaV1SelfAttention if v1 else DisentangledSelfAttention)(config, **kw)
        self.output = BertSelfOutput(config, **kw, width=self.self.num_heads * self.self.head_dim)

    def __call__(self, x, mask, rel_embeddings, rel_index, rng=None, rows=None):
        attn_rng, out_rng = split_keys(rng, 2)
        if rows is None:
            return self.output(self.self(x, mask, rel_embeddings, rel_index, attn_rng), x, out_rng)
        x_rows = pick_rows(x.reshape(-1, x.shape[-1]), rows)  # the queries' input and the residual
        return self.output(self.self(x, mask, rel_embeddings, rel_index, attn_rng, rows, x_rows), x_rows, out_rng)


class DebertaV2Layer(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = DebertaV2Attention(config, **kw)
        # BERT's feed-forward block under the same names (dense, LayerNorm, the hidden dropout)
        self.intermediate = BertIntermediate(config, **kw)
        self.output = BertOutput(config, **kw)

    def __call__(self, x, mask, rel_embeddings, rel_index, rng=None, rows=None):
        """``[batch, seq, hidden]``, or with ``rows`` (flat indices) those positions' ``[n, hidden]``."""
        attn_rng, out_rng = split_keys(rng, 2)
        a = self.attention(x, mask, rel_embeddings, rel_index, attn_rng, rows)
        return self.output(self.intermediate(a), a, out_rng)


class Conv1d(nnx.Module):
    """``torch.nn.Conv1d`` over ``[batch, seq, channels]`` with its weight layout
    (``[out, in / groups, kernel]``) and same-length padding."""

    hf_param_map: ClassVar[dict] = {"weight": ("weight", False), "bias": ("bias", False)}

    def __init__(self, channels: int, kernel_size: int, groups: int, *, init_range, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.weight = nnx.Param(nnx.initializers.normal(init_range)(
            rngs.params(), (channels, channels // groups, kernel_size), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))
        self.groups, self.padding, self.dtype = groups, (kernel_size - 1) // 2, dtype

    def __call__(self, x):
        w = self.weight.get_value().astype(self.dtype)
        out = jax.lax.conv_general_dilated(x.astype(self.dtype), w, window_strides=(1,),
                                           padding=[(self.padding, self.padding)],
                                           dimension_numbers=("NWC", "OIW", "NWC"), feature_group_count=self.groups)
        return out + self.bias.get_value().astype(self.dtype)[None, None]


class ConvLayer(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kernel, groups = getattr(config, "conv_kernel_size", 3), getattr(config, "conv_groups", 1)
        self.conv = Conv1d(config.hidden_size, kernel, groups, init_range=config.initializer_range, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
        self.LayerNorm = _norm(config, config.hidden_size, dtype, param_dtype, rngs)
        self.act = getattr(config, "conv_act", "tanh")
        self.rate = float(config.hidden_dropout_prob)

    def __call__(self, x, residual, input_mask, rng=None):
        keep = input_mask[..., None]
        out = jnp.where(keep, self.conv(x), 0.0).astype(x.dtype)
        out = ACTIVATIONS[self.act](dropout(out, self.rate, rng))
        return self.LayerNorm(residual + out) * keep.astype(x.dtype)


class DebertaV2Encoder(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # peftjax options set on the config (see nn._scan): layers stacked and scanned; remat policy
        self.remat = check_remat(getattr(config, "remat", "none"))
        self.layer = make_layers(config, lambda _, r: DebertaV2Layer(config, dtype=dtype, param_dtype=param_dtype,
                                                                     rngs=r), rngs=rngs)
        self.relative = bool(getattr(config, "relative_attention", False))
        self.buckets, self.max_relative, self.span = relative_span(config)
        self.rel_embeddings = nnx.data(None)
        self.LayerNorm = nnx.data(None)
        if self.relative:
            self.rel_embeddings = _embed(config, 2 * self.span, config.hidden_size, **kw)
        if "layer_norm" in str(getattr(config, "norm_rel_ebd", "none")).lower():  # built, as transformers', even
            self.LayerNorm = _norm(config, config.hidden_size, **kw)              # without relative attention
        self.conv = nnx.data(None)
        if getattr(config, "conv_kernel_size", 0) > 0:
            self.conv = ConvLayer(config, **kw)

    def __call__(self, x, mask, input_mask, rng=None, rows=None):
        """The last layer's output ``[batch, seq, hidden]``, or with ``rows`` (``[n]`` flat indices)
        only those positions', ``[n, hidden]``, which the last layer then computes alone."""
        rel = index = None
        if self.relative:
            index = relative_index(x.shape[1], self.buckets, self.max_relative, self.span)
            # only the table's rows this length reaches (those of distances up to seq - 1 either
            # way): the scores against the others would be computed and never read
            lo, hi = int(index.min()), int(index.max())
            rel, index = self.rel_embeddings.embedding.get_value()[lo:hi + 1].astype(x.dtype), index - lo
            if self.LayerNorm is not None:
                rel = self.LayerNorm(rel)
        layers_rng, conv_rng = split_keys(rng, 2)

        def fn(layer, h, k):
            return layer(h, mask, rel, index, k)

        last = len(self.layer) - 1
        if rows is not None and self.conv is not None and last == 0:  # the convolution needs every position
            return pick_rows(self(x, mask, input_mask, rng).reshape(-1, x.shape[-1]), rows)
        whole = last if rows is not None else last + 1  # the layers that compute every position
        if self.conv is None:
            h = run_layers(self.layer, fn, x, self.remat, layers_rng, stop=None if rows is None else last)
        else:  # the convolution joins the first layer's output; the others then run one by one
            h = self.conv(x, run_layer(self.layer, 0, fn, x, self.remat, layers_rng), input_mask, conv_rng)
            for i in range(1, whole):
                h = run_layer(self.layer, i, fn, h, self.remat, layers_rng)
        if rows is None:
            return h
        return run_layer(self.layer, last, lambda layer, h, k: layer(h, mask, rel, index, k, rows=rows), h,
                         self.remat, layers_rng)


class DebertaV2Model(PreTrainedModel):
    """The encoder: ``embeddings`` and ``encoder`` (layers, relative table, optional convolution).

    >>> from transformers import DebertaV2Config
    >>> config = DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                          intermediate_size=48, relative_attention=True, pos_att_type="p2c|c2p",
    ...                          position_buckets=8, share_att_key=True, position_biased_input=False)
    >>> DebertaV2Model.from_config(config)(input_ids=[[1, 5, 7, 2]]).last_hidden_state.shape
    (1, 4, 32)
    """

    base_model_prefix: ClassVar[str] = "deberta"
    # a non-persistent buffer; a v3 checkpoint's unused absolute positions; the pre-training heads
    # of the Hub's checkpoints (legacy ``cls``, v3's ``lm_predictions`` and its replaced-token
    # detection ``mask_predictions``)
    ignored_keys: ClassVar[tuple[str, ...]] = (
        r"(deberta\.)?embeddings\.position_ids", r"(deberta\.)?embeddings\.position_embeddings\.weight",
        r"cls\..*", r"lm_predictions\..*", r"mask_predictions\..*",
    )

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        check_config(self.config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = DebertaV2Embeddings(self.config, **kw)
        self.encoder = DebertaV2Encoder(self.config, **kw)
        # packed rows: every relative distance within a sequence is its unpacked one; the
        # convolution would reach across the sequences' boundaries
        self.packs_sequences = self.encoder.conv is None

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """``last_hidden_state`` ``[batch, seq, hidden]``.

        Args:
          input_ids: ``[batch, seq]`` token ids (or pass ``inputs_embeds``, ``embedding_size`` wide).
          attention_mask: ``[batch, seq]``, 1 on real tokens (default: all 1).
          token_type_ids: ``[batch, seq]`` (default 0; read only with ``type_vocab_size > 0``).
          position_ids: ``[batch, seq]`` absolute positions (default ``0 .. seq-1``; read only
            with ``position_biased_input``). The relative positions always count columns.
          dropout_rng: a ``jax.random`` key to apply dropout (training); ``None``: no dropout.
          segment_ids: ``[batch, seq]`` packed rows (``Batcher(packing=True)``): a positive id per
            sequence, 0 on padding; each token attends within its own sequence, and absolute
            positions restart at each.

        Raises:
          ValueError: ``segment_ids`` with the convolution (``conv_kernel_size``), which would mix
            neighbouring sequences.
        """
        return ModelOutput(last_hidden_state=self._encode(input_ids, attention_mask, token_type_ids, position_ids,
                                                          inputs_embeds, dropout_rng, segment_ids))

    def first_token_states(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                           inputs_embeds=None, dropout_rng=None, segment_ids=None, segment_starts=None) -> jax.Array:
        """Each sequence's first token (``[CLS]``) out of the last layer, ``[n, hidden]`` (``n`` =
        batch, or the packed sequences of ``segment_starts``), which the last layer computes alone
        (its queries, attention output and feed-forward; keys and values everywhere) unless an
        adapter needs every position. What the sequence classifier's pooler reads; the arguments
        are :meth:`__call__`'s."""
        b, s = (jnp.shape(input_ids) if inputs_embeds is None else jnp.shape(inputs_embeds)[:2])
        firsts = jnp.arange(b) * s if segment_starts is None else jnp.asarray(segment_starts)
        if every_position_required():
            h = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                             segment_ids)
            return pick_rows(h.reshape(b * s, -1), firsts)
        return self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                            segment_ids, rows=firsts)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                segment_ids, rows=None) -> jax.Array:
        """The last layer's states, ``[batch, seq, hidden]``, or at ``rows`` only, ``[n, hidden]``."""
        if segment_ids is not None and not self.packs_sequences:
            raise ValueError("deberta-v2: segment_ids (packed rows) with conv_kernel_size is not supported: the "
                             "convolution would reach across the packed sequences")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.word_embeddings(jnp.asarray(input_ids))
        x = jnp.asarray(inputs_embeds)
        b, s = x.shape[:2]
        if s > self.config.max_position_embeddings and self.embeddings.position_embeddings is not None:
            limit = self.config.max_position_embeddings
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings {limit}")
        input_mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(s), (b, s)) if segment_ids is None else \
                attn.segment_positions(segment_ids)
        types = jnp.zeros((b, s), jnp.int32) if token_type_ids is None else jnp.asarray(token_type_ids)
        emb_rng, enc_rng = split_keys(dropout_rng, 2)
        if segment_ids is not None:
            input_mask = input_mask & (jnp.asarray(segment_ids) > 0)
        x = self.embeddings(x, types, jnp.asarray(position_ids), input_mask, emb_rng)
        # a query sees a key only when both are real tokens (transformers' mask is their product)
        mask = (input_mask[:, None, :, None] & input_mask[:, None, None, :])
        mask = attn.within_segments(mask, segment_ids)
        return self.encoder(x, mask, input_mask, enc_rng, rows)


class ContextPooler(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        width = getattr(config, "pooler_hidden_size", None) or config.hidden_size
        self.dense = nnx.Linear(width, width, **linear_kw(config, dtype, param_dtype, rngs))
        self.act = getattr(config, "pooler_hidden_act", "gelu")
        self.rate = float(getattr(config, "pooler_dropout", 0.0))

    def __call__(self, first_tokens, rng=None):
        return ACTIVATIONS[self.act](self.dense(dropout(first_tokens, self.rate, rng)))


def deberta_sequence_loss(logits: jax.Array, labels: jax.Array, config) -> jax.Array:
    """transformers' DeBERTa-v2 loss: with no ``problem_type``, integer labels below 0 are left
    out (0 when none counts) and float labels of ``num_labels`` columns are soft targets; a
    set ``problem_type`` (or one label: regression) gives the usual losses."""
    if getattr(config, "problem_type", None) is not None or config.num_labels == 1:
        return sequence_classification_loss(logits, labels, config)
    logits = logits.astype(jnp.float32)
    if labels.ndim == 1 or labels.shape[-1] == 1:
        labels = labels.reshape(-1).astype(jnp.int32)
        counted = labels >= 0
        per_row = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.where(counted, labels, 0)[:, None], -1)[:, 0]
        return jnp.sum(per_row * counted) / jnp.maximum(jnp.sum(counted), 1)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=-1))


class _DebertaV2Task(PreTrainedModel):
    base_model_prefix: ClassVar[str] = "deberta"
    ignored_keys: ClassVar[tuple[str, ...]] = DebertaV2Model.ignored_keys

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.deberta = DebertaV2Model(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class DebertaV2ForSequenceClassification(_DebertaV2Task):
    """``deberta``, ``pooler`` on ``[CLS]``, dropout (``cls_dropout``) and a linear ``classifier``."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)", r"pooler\.dense\.(weight|bias)")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pooler = ContextPooler(config, **kw)
        rate = getattr(config, "cls_dropout", None)
        self.rate = float(config.hidden_dropout_prob if rate is None else rate)
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.classifier = nnx.Linear(config.hidden_size, config.num_labels, **kw)

    @property
    def packs_sequences(self) -> bool:
        return self.deberta.packs_sequences

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, labels=None, dropout_rng=None, segment_ids=None,
                 segment_starts=None) -> ModelOutput:
        """``[batch, num_labels]`` logits; ``labels`` add transformers' DeBERTa loss
        (:func:`deberta_sequence_loss`). Packed rows (``segment_ids``, and ``segment_starts``: the
        flat index ``row * seq + column`` of each sequence's first token) give a row of logits per
        sequence (``labels`` likewise)."""
        base_rng, pool_rng, head_rng = split_keys(dropout_rng, 3)
        first = self.deberta.first_token_states(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                                base_rng, segment_ids, segment_starts)
        pooled = self.pooler(first, pool_rng)
        logits = self.classifier(dropout(pooled, self.rate, head_rng))
        loss = None if labels is None else deberta_sequence_loss(logits, jnp.asarray(labels), self.config)
        return ModelOutput(logits=logits, loss=loss)


class DebertaV2ForMultipleChoice(MultipleChoice, _DebertaV2Task):
    """``deberta``, ``pooler`` on each choice's ``[CLS]``, dropout (``cls_dropout``) and a
    one-score ``classifier``: inputs ``[batch, choices, seq]``, logits ``[batch, choices]``."""

    optional_keys: ClassVar[tuple[str, ...]] = DebertaV2ForSequenceClassification.optional_keys

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.pooler = ContextPooler(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rate = getattr(config, "cls_dropout", None)
        self.rate = float(config.hidden_dropout_prob if rate is None else rate)
        self.classifier = nnx.Linear(config.hidden_size, 1, **linear_kw(config, dtype, param_dtype, rngs))

    def choice_logits(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng):
        base_rng, pool_rng, head_rng = split_keys(dropout_rng, 3)
        first = self.deberta.first_token_states(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                                base_rng)
        return self.classifier(dropout(self.pooler(first, pool_rng), self.rate, head_rng))[:, 0]


class DebertaV2ForTokenClassification(_DebertaV2Task):
    """A label per token after dropout (``hidden_dropout_prob``); ``labels`` -100 where none counts."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.rate = float(self.config.hidden_dropout_prob)
        self.classifier = nnx.Linear(self.config.hidden_size, self.config.num_labels,
                                     **linear_kw(self.config, dtype, param_dtype, rngs))

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, labels=None, dropout_rng=None) -> ModelOutput:
        base_rng, head_rng = split_keys(dropout_rng, 2)
        h = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         base_rng).last_hidden_state
        logits = self.classifier(dropout(h, self.rate, head_rng))
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels))


class DebertaV2ForQuestionAnswering(_DebertaV2Task):
    """A start and an end logit per token (``qa_outputs``), transformers' span loss."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"qa_outputs\.(weight|bias)",)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        check_span_labels(self, self.config)
        self.qa_outputs = nnx.Linear(self.config.hidden_size, 2, **linear_kw(self.config, dtype, param_dtype, rngs))

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, start_positions=None, end_positions=None, dropout_rng=None) -> ModelOutput:
        h = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         dropout_rng).last_hidden_state
        return ModelOutput(**span_outputs(self.qa_outputs(h), start_positions, end_positions))


class _HeadTransform(nnx.Module):
    """``dense`` (to ``width``), the hidden activation, ``LayerNorm``."""

    def __init__(self, config, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = nnx.Linear(config.hidden_size, width, **linear_kw(config, dtype, param_dtype, rngs))
        self.LayerNorm = _norm(config, width, dtype, param_dtype, rngs)
        self.act = config.hidden_act

    def __call__(self, x):
        return self.LayerNorm(ACTIVATIONS[self.act](self.dense(x)))


class LegacyDebertaV2LMPredictionHead(MaskedLMHead):
    """``cls.predictions`` (``legacy=True``): ``transform`` (to the embedding width), then the word
    embeddings' transpose (the tied ``decoder``) plus ``bias``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = getattr(config, "embedding_size", None) or config.hidden_size
        self.transform = _HeadTransform(config, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, word_embeddings):
        return self.decode(self.transform(x), word_embeddings)


class DebertaV2LMPredictionHead(MaskedLMHead):
    """``lm_predictions.lm_head`` (``legacy=False``, the v3 releases' head): ``dense``, the
    activation and ``LayerNorm`` in place, then the word embeddings' transpose plus ``bias``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense = nnx.Linear(config.hidden_size, config.hidden_size, **linear_kw(config, dtype, param_dtype, rngs))
        self.LayerNorm = _norm(config, config.hidden_size, dtype, param_dtype, rngs)
        self.act = config.hidden_act

    def __call__(self, x, word_embeddings):
        return self.decode(self.LayerNorm(ACTIVATIONS[self.act](self.dense(x))), word_embeddings)


class _Predictions(nnx.Module):
    """The holder transformers names: ``cls.predictions`` or ``lm_predictions.lm_head``."""

    def __init__(self, name: str, head: nnx.Module):
        setattr(self, name, head)
        self.name = name

    def __call__(self, x, word_embeddings):
        return getattr(self, self.name)(x, word_embeddings)


class DebertaV2ForMaskedLM(_DebertaV2Task):
    """Masked language modelling, as transformers': ``deberta`` and, by the config's ``legacy``
    (transformers' default: true), ``cls.predictions`` (a transform to the embedding width and the
    decoder tied to the word embeddings) or ``lm_predictions.lm_head`` (the head the v3 releases
    hold). ``labels`` (-100 where no token is predicted) add the mean cross entropy over the
    labelled ones. A v3 release read with ``legacy`` true gets a new ``cls`` head, as in
    transformers (its ``lm_predictions`` are ignored): pass ``legacy=False`` to read them.

    Raises:
      ValueError: ``legacy=False`` with an ``embedding_size`` other than the hidden size (the head
        multiplies hidden states by the word embeddings), or untied word embeddings.
    """

    optional_keys: ClassVar[tuple[str, ...]] = (r"cls\.predictions\.(bias|transform\..*)",
                                                r"lm_predictions\.lm_head\..*")
    tied_keys: ClassVar[tuple[str, ...]] = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        check_tied_decoder(self, config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if getattr(config, "legacy", True):
            self.cls = _Predictions("predictions", LegacyDebertaV2LMPredictionHead(config, **kw))
        else:
            width = getattr(config, "embedding_size", None) or config.hidden_size
            if width != config.hidden_size:
                raise ValueError(f"deberta-v2: legacy=False needs embedding_size ({width}) equal to hidden_size "
                                 f"({config.hidden_size}): its head multiplies hidden states by the word embeddings")
            self.lm_predictions = _Predictions("lm_head", DebertaV2LMPredictionHead(config, **kw))

    def _tied(self, key: str) -> bool:
        return key in self.tied_keys

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, labels=None, dropout_rng=None) -> ModelOutput:
        """``[batch, seq, vocab]`` logits; ``labels`` add the loss over the labelled tokens."""
        h = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         dropout_rng).last_hidden_state
        head = self.cls if getattr(self.config, "legacy", True) else self.lm_predictions
        logits = head(h, self.deberta.embeddings.word_embeddings)
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels), last_hidden_state=h)


register(DebertaV2Model, model_types=("deberta-v2",), default=True)
for _cls in (DebertaV2ForSequenceClassification, DebertaV2ForTokenClassification, DebertaV2ForQuestionAnswering,
             DebertaV2ForMaskedLM, DebertaV2ForMultipleChoice):
    register(_cls)


# DeBERTa (v1, ``model_type`` ``"deberta"``): v2's layers, embeddings, heads and relative scores (no
# buckets, no convolution, no shared keys there), with v1's attention projections; a config's
# ``model_type`` picks them (DebertaV2Attention). transformers has no v1 multiple-choice head.


class DebertaModel(DebertaV2Model):
    """DeBERTa (v1)'s encoder: ``embeddings`` and ``encoder``, each layer's attention a fused ``in_proj``
    with ``q_bias``/``v_bias`` and, with relative attention, ``pos_proj``/``pos_q_proj``."""


class DebertaForSequenceClassification(DebertaV2ForSequenceClassification):
    """``deberta``, ``pooler`` on ``[CLS]``, dropout (``cls_dropout``) and ``classifier``, as v2's."""


class DebertaForTokenClassification(DebertaV2ForTokenClassification):
    """A label per token, as v2's."""


class DebertaForQuestionAnswering(DebertaV2ForQuestionAnswering):
    """A start and an end logit per token, as v2's."""


class DebertaForMaskedLM(DebertaV2ForMaskedLM):
    """Masked language modelling with v2's heads (``cls.predictions`` or ``lm_predictions.lm_head`` by ``legacy``)."""


register(DebertaModel, model_types=("deberta",), default=True)
for _cls in (DebertaForSequenceClassification, DebertaForTokenClassification, DebertaForQuestionAnswering,
             DebertaForMaskedLM):
    register(_cls)
