"""BERT encoders in Flax NNX, with transformers' module names.

Absolute position embeddings, token types, post-LayerNorm residual blocks, the tanh pooler and a
sequence classification head. Dropout runs only when a ``dropout_rng`` key is passed (the
equivalent of torch's ``.train()``); without one the model is deterministic (``.eval()``). The key
is split explicitly, so the model's state holds nothing but ``nnx.Param``.
"""

from __future__ import annotations

import os
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.nn._dropout import layer_key, split_keys
from peftjax.models._losses import check_span_labels, sequence_classification_loss, span_outputs, token_labels_loss
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._multiple_choice import MultipleChoice
from peftjax.models._outputs import ModelOutput
from peftjax.nn._positions import every_position_required
from peftjax.nn._scan import check_remat, make_layers, run_layer, run_layers
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._functional import softmax



def _check_config(config) -> None:
    """Rejects what this implementation does not compute, before any weight is built."""
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"position_embedding_type {position!r} is not supported; only 'absolute' is")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention) is not supported; only the encoder is")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )


def pick_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """``x[rows]`` of a ``[tokens, hidden]`` array as a one-hot product: exact (one term per sum),
    and its gradient a product too, not a scatter."""
    one_hot = (jnp.asarray(rows)[:, None] == jnp.arange(x.shape[0])[None, :]).astype(x.dtype)
    return one_hot @ x


def absolute_position_ids(shape: tuple[int, int], n_prefix: int, max_positions: int) -> jax.Array:
    """``[batch, seq]`` positions ``0 .. seq-1`` (``V .. V+seq-1`` after a prefix of ``V`` entries)
    into a table of ``max_positions`` learned position embeddings.

    Raises:
      ValueError: the sequence (after the prefix) runs past the table.
    """
    b, s = shape
    if n_prefix + s > max_positions:
        after = f" after a prefix of {n_prefix}" if n_prefix else ""
        raise ValueError(f"sequence length {s}{after} exceeds max_position_embeddings {max_positions}")
    return jnp.broadcast_to(n_prefix + jnp.arange(s), (b, s))


def linear_kw(config, dtype, param_dtype, rngs) -> dict:
    # transformers' _init_weights: normal(0, initializer_range) for Linear and Embedding weights
    init = nnx.initializers.normal(config.initializer_range)
    return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=init)


def _layer_norm(config, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class BertEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs, width: int | None = None):
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, embedding_init=init)
        h = width or config.hidden_size  # ELECTRA's embeddings are narrower (embedding_size)
        self.word_embeddings = nnx.Embed(config.vocab_size, h, **kw)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, h, **kw)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, h, **kw)
        self.LayerNorm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        self.dropout_rate = float(config.hidden_dropout_prob)

    def __call__(self, inputs_embeds, token_type_ids, position_ids, rng=None):
        x = inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        return dropout(self.LayerNorm(x), self.dropout_rate, rng)


class BertSelfAttention(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        kw = linear_kw(config, dtype, param_dtype, rngs)
        h = config.hidden_size
        self.query = nnx.Linear(h, h, **kw)
        self.key = nnx.Linear(h, h, **kw)
        self.value = nnx.Linear(h, h, **kw)
        self.dropout_rate = float(config.attention_probs_dropout_prob)

    def __call__(self, x, mask, rng=None, prefix=None, rows=None, x_rows=None):
        """``[batch, seq, hidden]``; with ``rows`` (``[n]`` flat indices ``row * seq + column``) and
        ``x_rows`` (``x`` at those positions, ``[n, hidden]``) the output of those queries only,
        ``[n, hidden]``, each attending to its own row's keys."""
        # not attn.dot_product_attention: BERT drops attention probabilities, which that one never sees
        b, s, _ = x.shape
        k = self.key(x).reshape(b, s, self.num_heads, self.head_dim)
        v = self.value(x).reshape(b, s, self.num_heads, self.head_dim)
        if prefix is not None:
            k, v = attn.prepend_prefix(k, prefix[0]), attn.prepend_prefix(v, prefix[1])
        if rows is not None:
            return self._attend_rows(x_rows, k, v, mask, rng, rows, s)
        q = self.query(x).reshape(b, s, self.num_heads, self.head_dim)
        return attn.dropped_attention(q, k, v, mask, scale=self.head_dim**-0.5, rate=self.dropout_rate,
                                      rng=rng).reshape(b, s, -1)

    def _attend_rows(self, x_rows, k, v, mask, rng, rows, s):
        """The kept queries' attention, ``[n, hidden]``: each against every key of the batch, the
        keys of other rows masked out. Picking rows by one-hot products rather than gathers keeps
        the backward pass free of scatters (which XLA:CPU compiles slowly), and the extra keys
        cost ``n x batch`` instead of ``n`` rows of scores: nothing beside the projections."""
        b, n_keys = k.shape[:2]
        q = self.query(x_rows).reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(b * n_keys, self.num_heads, self.head_dim)
        v = v.reshape(b * n_keys, self.num_heads, self.head_dim)
        row, column = rows // s, rows % s
        own = jnp.broadcast_to(mask, (b, 1, s, n_keys))[row, 0, column]  # [n, keys]: each query's mask row
        same_row = (jnp.arange(b * n_keys) // n_keys)[None, :] == row[:, None]
        keep = same_row & jnp.tile(own, (1, b))  # [n, batch * keys]
        scores = jnp.einsum("nhd,khd->nhk", q, k).astype(jnp.float32) * self.head_dim**-0.5
        scores = jnp.where(keep[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = dropout(softmax(scores, axis=-1).astype(v.dtype), self.dropout_rate, rng)
        return jnp.einsum("nhk,khd->nhd", probs, v).reshape(rows.shape[0], -1)


class BertSelfOutput(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs, width: int | None = None):
        h = config.hidden_size  # ``width``: the attention's output, if not the hidden size (DeBERTa's head size)
        self.dense = nnx.Linear(width or h, h, **linear_kw(config, dtype, param_dtype, rngs))
        self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = float(config.hidden_dropout_prob)

    def __call__(self, x, residual, rng=None):
        return self.LayerNorm(dropout(self.dense(x), self.dropout_rate, rng) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self = BertSelfAttention(config, **kw)
        self.output = BertSelfOutput(config, **kw)

    def __call__(self, x, mask, rng=None, prefix=None, rows=None):
        attn_rng, out_rng = split_keys(rng, 2)
        if rows is None:
            return self.output(self.self(x, mask, attn_rng, prefix), x, out_rng)
        x_rows = pick_rows(x.reshape(-1, x.shape[-1]), rows)  # the queries' input and the residual
        return self.output(self.self(x, mask, attn_rng, prefix, rows, x_rows), x_rows, out_rng)


class BertIntermediate(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.dense = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.hidden_act = config.hidden_act

    def __call__(self, x):
        return ACTIVATIONS[self.hidden_act](self.dense(x))


class BertOutput(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        self.dense = nnx.Linear(config.intermediate_size, h, **linear_kw(config, dtype, param_dtype, rngs))
        self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = float(config.hidden_dropout_prob)

    def __call__(self, x, residual, rng=None):
        return self.LayerNorm(dropout(self.dense(x), self.dropout_rate, rng) + residual)


class BertLayer(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = BertAttention(config, **kw)
        self.intermediate = BertIntermediate(config, **kw)
        self.output = BertOutput(config, **kw)

    def __call__(self, x, mask, rng=None, prefix=None, rows=None):
        """``[batch, seq, hidden]``, or with ``rows`` (flat indices) those positions' ``[n, hidden]``,
        computed for them alone: their queries, attention output and feed-forward block."""
        attn_rng, out_rng = split_keys(rng, 2)
        a = self.attention(x, mask, attn_rng, prefix, rows)
        return self.output(self.intermediate(a), a, out_rng)


class BertEncoder(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        # peftjax options set on the config (see nn._scan): layers stacked and scanned; remat policy
        self.remat = check_remat(getattr(config, "remat", "none"))
        self.layer = make_layers(
            config, lambda _, r: BertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r), rngs=rngs
        )

    def __call__(self, x, mask, rng=None, prefix_kv=None, rows=None):
        """The last layer's output ``[batch, seq, hidden]``, or with ``rows`` (``[n]`` flat indices)
        only those positions', ``[n, hidden]``, which the last layer then computes alone."""
        last = len(self.layer) - 1
        if prefix_kv is None:  # scanned and/or rematerialised, dropout or not
            if rows is None:
                return run_layers(self.layer, lambda layer, h, k: layer(h, mask, k), x, self.remat, rng)
            x = run_layers(self.layer, lambda layer, h, k: layer(h, mask, k), x, self.remat, rng, stop=last)
            return run_layer(self.layer, last, lambda layer, h, k: layer(h, mask, k, rows=rows), x, self.remat, rng)
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, layer_key(rng, i), prefix_kv[i], rows if i == last else None)
        return x


class BertPooler(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        self.dense = nnx.Linear(h, h, **linear_kw(config, dtype, param_dtype, rngs))

    def __call__(self, first_tokens):
        """``[n, hidden]``: each sequence's first (``[CLS]``) token."""
        return jnp.tanh(self.dense(first_tokens))


class BertModel(PreTrainedModel):
    """The BERT encoder: ``embeddings``, ``encoder.layer``, and the ``pooler`` unless dropped.

    ``add_pooling_layer`` defaults to the config's ``add_pooling_layer`` attribute (absent: true),
    which ``from_pretrained(path, add_pooling_layer=False)`` sets, so a saved pooler-less model
    reloads without one.

    >>> from transformers import BertConfig
    >>> config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
    ...                     num_attention_heads=4, intermediate_size=37)
    >>> model = BertModel.from_config(config)
    >>> out = model(input_ids=[[2, 5, 7, 0]], attention_mask=[[1, 1, 1, 0]])
    >>> out.last_hidden_state.shape, out.pooler_output.shape
    ((1, 4, 32), (1, 32))
    """

    base_model_prefix: ClassVar[str] = "bert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"pooler\.dense\.(weight|bias)",)
    # the embeddings' and the encoder's modules (MPNet's differ)
    embeddings_class: ClassVar[type[nnx.Module]] = BertEmbeddings
    encoder_class: ClassVar[type[nnx.Module]] = BertEncoder
    # non-persistent buffers some checkpoints still carry, and the pre-training heads (MLM, NSP)
    ignored_keys: ClassVar[tuple[str, ...]] = (
        r"(bert\.)?embeddings\.(position_ids|token_type_ids)",
        r"cls\..*",
    )

    def __init__(
        self,
        config,
        *,
        add_pooling_layer: bool | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        if add_pooling_layer is None:
            add_pooling_layer = getattr(config, "add_pooling_layer", True)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = self.embeddings_class(config, **kw, width=self.embedding_width(config))
        self.encoder = self.encoder_class(config, **kw)
        self.pooler = nnx.data(None)
        if add_pooling_layer:
            self.pooler = BertPooler(config, **kw)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype=None, *, add_pooling_layer: bool | None = None, **kwargs
    ):
        """Loads a checkpoint, as ``PreTrainedModel.from_pretrained``, optionally without the pooler."""
        # not a config override: transformers' from_dict drops overrides that are not config fields
        attributes = {} if add_pooling_layer is None else {"add_pooling_layer": bool(add_pooling_layer)}
        return super().from_pretrained(path, dtype, config_attributes=attributes, **kwargs)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        dropout_rng=None,
        prefix_kv=None,
        segment_ids=None,
        segment_starts=None,
        output_last_hidden_state: bool = True,
    ) -> ModelOutput:
        """Encodes a batch.

        Args:
          input_ids: ``[batch, seq]`` token ids (or pass ``inputs_embeds``).
          attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding (default: all 1).
          token_type_ids: ``[batch, seq]`` token types, sentence A or B (default: all 0).
          position_ids: ``[batch, seq]`` (default: ``0 .. seq-1``, or ``V .. V+seq-1`` after a
            prefix, or with ``segment_ids`` restarting at each packed sequence).
          inputs_embeds: ``[batch, seq, hidden]`` word embeddings in place of ``input_ids``.
          dropout_rng: a ``jax.random`` key to apply dropout (training); ``None``: no dropout.
          prefix_kv: per-layer ``(key, value)`` prefixes ``[batch, V, heads, head_dim]``, seen by
            every token (the prefix attention protocol of ``peftjax.models._attention``).
          segment_ids: ``[batch, seq]`` packed rows (``Batcher(packing=True)``): a positive id per
            sequence, 0 on padding; each token attends within its own sequence only.
          segment_starts: ``[n]`` flat index (``row * seq + column``) of each packed sequence's
            first token: ``pooler_output`` is then per sequence, ``[n, hidden]``.
          output_last_hidden_state: ``False`` (with a pooler) computes the last layer at the
            pooled ``[CLS]`` positions only (queries, attention output, feed-forward; keys and
            values everywhere): the same ``pooler_output`` for less work, ``last_hidden_state``
            ``None``. The sequence classifier calls it so.

        Returns:
          ``ModelOutput`` with ``last_hidden_state`` and ``pooler_output`` (``None`` without a pooler).
        """
        first_only = self.pooler is not None and not output_last_hidden_state
        h, first = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                                prefix_kv, segment_ids, segment_starts, first_only=first_only)
        pooled = None if self.pooler is None else self.pooler(first)
        return ModelOutput(last_hidden_state=h, pooler_output=pooled)

    def first_token_states(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        dropout_rng=None,
        prefix_kv=None,
        segment_ids=None,
        segment_starts=None,
    ) -> jax.Array:
        """Each sequence's first token (``[CLS]``, ``<s>``) out of the last layer, ``[n, hidden]``
        (``n`` = batch, or the packed sequences of ``segment_starts``), which the last layer
        computes alone (queries, attention output, feed-forward; keys and values everywhere).
        What a classification head reads; the arguments are :meth:`__call__`'s."""
        return self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                            prefix_kv, segment_ids, segment_starts, first_only=True)[1]

    def embedding_width(self, config) -> int:
        """The embeddings' width: the hidden size (ELECTRA's narrower ones are projected up)."""
        return config.hidden_size

    def project_embeddings(self, x: jax.Array) -> jax.Array:
        """The embeddings as the first layer takes them (ELECTRA's ``embeddings_project``)."""
        return x

    def default_position_ids(self, input_ids, shape: tuple[int, int], n_prefix: int, segment_ids) -> jax.Array:
        """Positions when none are given: ``0 .. seq-1``, from ``V`` after a prefix of ``V``
        entries (as after a cache), restarting at each packed sequence."""
        if segment_ids is not None:
            return attn.segment_positions(segment_ids)
        return absolute_position_ids(shape, n_prefix, self.config.max_position_embeddings)

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng, prefix_kv,
                segment_ids, segment_starts, *, first_only: bool) -> tuple[jax.Array | None, jax.Array]:
        """``(last hidden state or None, first tokens' states)``: with ``first_only`` the last layer
        computes only the first tokens (unless an adapter needs every position)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            input_ids = jnp.asarray(input_ids)
            inputs_embeds = self.embeddings.word_embeddings(input_ids)
        x = jnp.asarray(inputs_embeds)
        b, s, _ = x.shape
        n_prefix = 0
        if prefix_kv is not None:
            a = self.encoder.layer[0].attention.self
            n_prefix = attn.check_prefix_kv(
                prefix_kv, num_layers=len(self.encoder.layer), kv_heads=a.num_heads, head_dim=a.head_dim, batch=b,
                owner=type(self).__name__,
            )
        if segment_ids is not None and prefix_kv is not None:
            raise ValueError(f"{type(self).__name__}: segment_ids (packed rows) with prefix_kv is not supported")
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, (b, s), n_prefix, segment_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, s), jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones((b, s), bool)
        if segment_ids is not None:
            mask = attn.segment_mask(segment_ids, attention_mask)
        else:
            key_mask = attn.prefix_key_mask(jnp.asarray(attention_mask), n_prefix)
            mask = attn.attention_mask_4d(n_prefix + jnp.arange(s), key_mask, causal=False)
        emb_rng, enc_rng = split_keys(dropout_rng, 2)
        x = self.project_embeddings(self.embeddings(x, jnp.asarray(token_type_ids), jnp.asarray(position_ids), emb_rng))
        firsts = jnp.arange(b) * s if segment_starts is None else jnp.asarray(segment_starts)
        if first_only and not every_position_required():
            # only the first tokens leave the last layer: it computes them alone
            return None, self.encoder(x, mask, enc_rng, prefix_kv, rows=firsts)
        h = self.encoder(x, mask, enc_rng, prefix_kv)
        return h, (h[:, 0] if segment_starts is None else h.reshape(b * s, -1)[firsts])


class BertForSequenceClassification(PreTrainedModel):
    """``bert`` (with its pooler), dropout, and a linear ``classifier`` on the pooled ``[CLS]``."""

    base_model_prefix: ClassVar[str] = "bert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)", r"bert\.pooler\.dense\.(weight|bias)")
    ignored_keys: ClassVar[tuple[str, ...]] = BertModel.ignored_keys

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.bert = BertModel(config, add_pooling_layer=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rate = getattr(config, "classifier_dropout", None)
        self.dropout_rate = float(config.hidden_dropout_prob if rate is None else rate)
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.classifier = nnx.Linear(config.hidden_size, config.num_labels, **kw)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        dropout_rng=None,
        prefix_kv=None,
        segment_ids=None,
        segment_starts=None,
    ) -> ModelOutput:
        """Classifies a batch; ``labels`` (``[batch]`` ints, or floats for regression) add the loss.

        ``prefix_kv``, ``segment_ids`` and ``segment_starts``: as for :class:`BertModel`; packed
        rows with ``segment_starts`` give one row of logits per sequence (``labels`` likewise).
        The last layer computes only the ``[CLS]`` positions the pooler reads (as
        ``output_last_hidden_state=False`` does; ``model.bert(...)`` gives every position), so the
        output carries ``logits``, ``loss`` and ``pooler_output``, as transformers' carries no
        hidden state unless asked.
        """
        bert_rng, head_rng = split_keys(dropout_rng, 2)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, bert_rng, prefix_kv,
                        segment_ids, segment_starts, output_last_hidden_state=False)
        logits = self.classifier(dropout(out.pooler_output, self.dropout_rate, head_rng))
        loss = None if labels is None else sequence_classification_loss(logits, jnp.asarray(labels), self.config)
        return ModelOutput(logits=logits, loss=loss, pooler_output=out.pooler_output)


class BertForTokenClassification(PreTrainedModel):
    """``bert`` (without a pooler), dropout, and a linear ``classifier`` on every token: PEFT's
    ``TOKEN_CLS`` (named entities, part-of-speech tags)."""

    base_model_prefix: ClassVar[str] = "bert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*BertModel.ignored_keys, r"(bert\.)?pooler\..*")
    # the encoder, held under base_model_prefix (``bert``; RoBERTa's subclasses: ``roberta``)
    backbone_class: ClassVar[type[BertModel]] = BertModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        backbone = self.backbone_class(config, add_pooling_layer=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        setattr(self, self.base_model_prefix, backbone)
        rate = getattr(config, "classifier_dropout", None)
        self.dropout_rate = float(config.hidden_dropout_prob if rate is None else rate)
        self.classifier = nnx.Linear(config.hidden_size, config.num_labels,
                                     **linear_kw(config, dtype, param_dtype, rngs))

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        dropout_rng=None,
        prefix_kv=None,
    ) -> ModelOutput:
        """Classifies every token, ``[batch, seq, num_labels]``; ``labels`` (``[batch, seq]`` ints,
        ``-100`` where no label counts: padding, a word's later sub-tokens) add the mean cross
        entropy over the labelled tokens, as transformers computes it."""
        base_rng, head_rng = split_keys(dropout_rng, 2)
        backbone = getattr(self, self.base_model_prefix)
        h = backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, base_rng,
                     prefix_kv).last_hidden_state
        logits = self.classifier(dropout(h, self.dropout_rate, head_rng))
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels))


class BertForQuestionAnswering(PreTrainedModel):
    """``bert`` (without a pooler) and a linear ``qa_outputs`` giving every token a start and an
    end logit: PEFT's ``QUESTION_ANS`` (extractive question answering, SQuAD's task)."""

    base_model_prefix: ClassVar[str] = "bert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"qa_outputs\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*BertModel.ignored_keys, r"(bert\.)?pooler\..*")
    backbone_class: ClassVar[type[BertModel]] = BertModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        check_span_labels(self, config)
        backbone = self.backbone_class(config, add_pooling_layer=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        setattr(self, self.base_model_prefix, backbone)
        self.qa_outputs = nnx.Linear(config.hidden_size, 2, **linear_kw(config, dtype, param_dtype, rngs))

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        dropout_rng=None,
        prefix_kv=None,
    ) -> ModelOutput:
        """``start_logits`` and ``end_logits``, ``[batch, seq]``: where each row's answer span starts
        and ends; ``start_positions`` and ``end_positions`` (``[batch]`` token indices) add
        transformers' loss (:func:`span_loss`)."""
        backbone = getattr(self, self.base_model_prefix)
        h = backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                     prefix_kv).last_hidden_state
        logits = self.qa_outputs(h)
        return ModelOutput(**span_outputs(logits, start_positions, end_positions))


class BertForMultipleChoice(MultipleChoice, PreTrainedModel):
    """``bert`` (with its pooler), dropout, and a linear ``classifier`` giving each choice's pooled
    ``[CLS]`` one score: inputs ``[batch, choices, seq]``, logits ``[batch, choices]``
    (:class:`~peftjax.models._multiple_choice.MultipleChoice`)."""

    base_model_prefix: ClassVar[str] = "bert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",
                                                r"(bert|roberta)\.pooler\.dense\.(weight|bias)")
    ignored_keys: ClassVar[tuple[str, ...]] = BertModel.ignored_keys
    # the encoder, held under base_model_prefix (``bert``; RoBERTa's subclasses: ``roberta``)
    backbone_class: ClassVar[type[BertModel]] = BertModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        backbone = self.backbone_class(config, add_pooling_layer=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        setattr(self, self.base_model_prefix, backbone)
        rate = getattr(config, "classifier_dropout", None)
        self.dropout_rate = float(config.hidden_dropout_prob if rate is None else rate)
        self.classifier = nnx.Linear(config.hidden_size, 1, **linear_kw(config, dtype, param_dtype, rngs))

    def choice_logits(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng):
        base_rng, head_rng = split_keys(dropout_rng, 2)
        backbone = getattr(self, self.base_model_prefix)
        pooled = backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, base_rng,
                          output_last_hidden_state=False).pooler_output
        return self.classifier(dropout(pooled, self.dropout_rate, head_rng))[:, 0]


class MaskedLMHead(nnx.Module):
    """A masked LM's head: ``transform`` (the model's ``dense``, activation and LayerNorm), then the
    word embeddings' transpose (the decoder is tied to them) plus an output ``bias`` per token."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"bias": ("bias", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = True):
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), param_dtype)) if use_bias else nnx.data(None)
        self.dtype = dtype

    def decode(self, x: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
        logits = word_embeddings.attend(x)
        if self.bias is None:
            return logits
        bias = self.bias.get_value().astype(self.dtype)
        return logits + bias.reshape((1,) * (x.ndim - 1) + bias.shape)


class BertPredictionHeadTransform(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        self.dense = nnx.Linear(h, h, **linear_kw(config, dtype, param_dtype, rngs))
        self.hidden_act = config.hidden_act
        self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.LayerNorm(ACTIVATIONS[self.hidden_act](self.dense(x)))


class BertLMPredictionHead(MaskedLMHead):
    """``cls.predictions``: ``transform`` and the tied decoder with its ``bias``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transform = BertPredictionHeadTransform(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, word_embeddings):
        return self.decode(self.transform(x), word_embeddings)


class BertOnlyMLMHead(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.predictions = BertLMPredictionHead(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, word_embeddings):
        return self.predictions(x, word_embeddings)


def check_tied_decoder(model, config) -> None:
    """A masked LM's decoder is its word embeddings' transpose (``tie_word_embeddings``, the
    default); an untied one would be a weight this model does not hold."""
    if getattr(config, "tie_word_embeddings", True) is False:
        raise ValueError(f"{type(model).__name__} ties its decoder to the word embeddings; "
                         "tie_word_embeddings=False is not supported")


class BertForMaskedLM(PreTrainedModel):
    """Masked language modelling: ``bert`` (without a pooler) and ``cls.predictions`` (``dense``,
    activation, LayerNorm, the word embeddings' transpose plus ``bias``), as transformers'. The
    logits are ``[batch, seq, vocab]``; ``labels`` (``[batch, seq]``, -100 where no token is
    predicted: every position but the masked ones) add the mean cross entropy over the labelled
    ones. No PEFT task type names it: its adapters have ``task_type=None`` (PEFT's ``PeftModel``);
    a masking collator's role is :func:`peftjax.training.mask_tokens`'s."""

    base_model_prefix: ClassVar[str] = "bert"
    # the head of a pre-training checkpoint (the Hub's), new if the checkpoint has none
    optional_keys: ClassVar[tuple[str, ...]] = (r"cls\.predictions\.(bias|transform\..*)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*BertModel.ignored_keys, r"(bert\.)?pooler\..*")
    # the decoder's weight is the word embeddings', its bias the head's ``bias``
    tied_keys: ClassVar[tuple[str, ...]] = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    backbone_class: ClassVar[type[BertModel]] = BertModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        check_tied_decoder(self, self.config)
        backbone = self.backbone_class(self.config, add_pooling_layer=False, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        setattr(self, self.base_model_prefix, backbone)
        self.build_head(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def build_head(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.cls = BertOnlyMLMHead(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def head(self, h: jax.Array) -> jax.Array:
        """``[batch, seq, vocab]`` logits of the last hidden states."""
        return self.cls(h, getattr(self, self.base_model_prefix).embeddings.word_embeddings)

    def _tied(self, key: str) -> bool:
        return key in self.tied_keys

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        dropout_rng=None,
        prefix_kv=None,
    ) -> ModelOutput:
        backbone = getattr(self, self.base_model_prefix)
        h = backbone(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                     prefix_kv).last_hidden_state
        logits = self.head(h)
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels), last_hidden_state=h)


register(BertModel, model_types=("bert",), default=True)
register(BertForSequenceClassification)
register(BertForTokenClassification)
register(BertForQuestionAnswering)
register(BertForMaskedLM)
register(BertForMultipleChoice)
