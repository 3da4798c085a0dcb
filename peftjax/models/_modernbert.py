"""ModernBERT (Answer.AI, ``model_type`` ``"modernbert"``) in Flax NNX, with transformers' module names.

An encoder for classification and retrieval at 8k tokens. What differs from BERT:

- RoPE instead of position embeddings, a base per layer type (``rope_parameters``: 160 000 for
  global layers, 10 000 for local ones by default; transformers 4's ``global_rope_theta`` and
  ``local_rope_theta``);
- ``layer_types``: one global layer in ``global_attn_every_n_layers`` (3), the others attend within
  ``local_attention // 2`` tokens either side (``|i - j| <= local_attention // 2``);
- pre-norm layers (``attn_norm``, none in layer 0; ``mlp_norm``) and a ``final_norm``, LayerNorms
  without biases by default (``norm_bias``); no token types;
- fused ``attn.Wqkv`` (queries, keys, values in that order) and ``attn.Wo``; a GeGLU MLP ``mlp.Wi``
  (``[hidden, 2 * intermediate]``: the activated half first, then the gate) and ``mlp.Wo``;
- the heads read ``head`` (``dense``, activation, ``norm``) then ``drop`` and ``classifier``; a
  sequence classifier pools the ``[CLS]`` token or the mean over real tokens (``classifier_pooling``).

Dropout (embeddings, attention probabilities and output, MLP, classifier) runs only with a
``dropout_rng`` key, as torch's ``.train()``.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._bert import MaskedLMHead, check_tied_decoder
from peftjax.nn._activations import ACTIVATIONS
from peftjax.models._dropout import dropout
from peftjax.models._layer_kinds import LAYER_TYPES, rope_parameters_by_type, rotary_of
from peftjax.models._losses import sequence_classification_loss, span_outputs, token_labels_loss
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._multiple_choice import MultipleChoice
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import apply_rotary
from peftjax.nn._dropout import layer_key, split_keys
from peftjax.nn._functional import softmax

DEFAULT_THETA = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}
LEGACY_THETA = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}
POOLINGS = ("cls", "mean")


def modernbert_rope_parameters(config) -> dict[str, dict]:
    """``{layer type: RoPE parameters}`` as ``ModernBertConfig`` settles them: a ``rope_scaling``
    applies to both types, ``global_rope_theta`` / ``local_rope_theta`` give the bases.

    Raises:
      ValueError: ``rope_parameters`` not keyed by layer type.
    """
    return rope_parameters_by_type(config, DEFAULT_THETA, LEGACY_THETA, scaled=LAYER_TYPES)


def check_config(config) -> tuple[str, ...]:
    """The layer types, after refusing what this implementation does not compute.

    Raises:
      ValueError: an unknown activation, pooling or layer type, or a hidden size the heads do not divide.
      NotImplementedError: ``scan_layers`` or ``remat``.
    """
    for field in ("hidden_activation", "classifier_activation"):
        if getattr(config, field) not in ACTIVATIONS:
            raise ValueError(f"modernbert: {field} {getattr(config, field)!r} is not supported; supported: "
                             f"{sorted(ACTIVATIONS)}")
    if config.classifier_pooling not in POOLINGS:
        raise ValueError(f"modernbert: classifier_pooling {config.classifier_pooling!r} is not supported; "
                         f"supported: {list(POOLINGS)}")
    types = tuple(config.layer_types)
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != config.num_hidden_layers:
        raise ValueError(f"modernbert: layer_types must give one of {list(LAYER_TYPES)} for each of the "
                         f"{config.num_hidden_layers} layers; found {list(types)}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"modernbert: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")
    modernbert_rope_parameters(config)
    if getattr(config, "scan_layers", False) or getattr(config, "remat", "none") != "none":
        raise NotImplementedError("modernbert: scan_layers and remat are not implemented (layer 0 differs: it has no "
                                  "attn_norm)")
    return types


def _kw(config, dtype, param_dtype, rngs) -> dict:
    return dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                kernel_init=nnx.initializers.normal(config.initializer_range))


def _norm(config, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.norm_eps, use_bias=bool(config.norm_bias), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


class ModernBertEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.tok_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                        rngs=rngs, embedding_init=nnx.initializers.normal(config.initializer_range))
        self.norm = _norm(config, dtype, param_dtype, rngs)
        self.rate = float(config.embedding_dropout)

    def __call__(self, inputs_embeds, rng=None):
        return dropout(self.norm(inputs_embeds), self.rate, rng)


class ModernBertAttention(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, h // config.num_attention_heads
        bias = bool(config.attention_bias)
        self.Wqkv = nnx.Linear(h, 3 * h, use_bias=bias, **_kw(config, dtype, param_dtype, rngs))
        self.Wo = nnx.Linear(h, h, use_bias=bias, **_kw(config, dtype, param_dtype, rngs))
        self.rate = float(config.attention_dropout)

    def __call__(self, x, cos, sin, mask, rng=None):
        b, s, _ = x.shape
        qkv = self.Wqkv(x).reshape(b, s, 3, self.num_heads, self.head_dim)
        q, k, v = apply_rotary(qkv[:, :, 0], cos, sin), apply_rotary(qkv[:, :, 1], cos, sin), qkv[:, :, 2]
        probs_rng, out_rng = split_keys(rng, 2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.head_dim**-0.5
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        # a query that sees no key (padding beyond a local layer's reach) gets zeros, as torch's SDPA
        # (transformers' default attention) gives it, not a mean over masked keys
        probs = jnp.where(mask.any(axis=-1, keepdims=True), softmax(scores, axis=-1), 0.0)
        probs = dropout(probs.astype(v.dtype), self.rate, probs_rng)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, -1)
        return dropout(self.Wo(out), self.rate, out_rng)


class ModernBertMLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, i = config.hidden_size, config.intermediate_size
        bias = bool(config.mlp_bias)
        self.Wi = nnx.Linear(h, 2 * i, use_bias=bias, **_kw(config, dtype, param_dtype, rngs))
        self.Wo = nnx.Linear(i, h, use_bias=bias, **_kw(config, dtype, param_dtype, rngs))
        self.act = config.hidden_activation
        self.rate = float(config.mlp_dropout)

    def __call__(self, x, rng=None):
        h, gate = jnp.split(self.Wi(x), 2, axis=-1)
        return self.Wo(dropout(ACTIVATIONS[self.act](h) * gate, self.rate, rng))


class ModernBertEncoderLayer(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = nnx.data(None) if layer_idx == 0 else _norm(config, **kw)
        self.attn = ModernBertAttention(config, **kw)
        self.mlp_norm = _norm(config, **kw)
        self.mlp = ModernBertMLP(config, **kw)

    def __call__(self, x, cos, sin, mask, rng=None):
        attn_rng, mlp_rng = split_keys(rng, 2)
        x = x + self.attn(x if self.attn_norm is None else self.attn_norm(x), cos, sin, mask, attn_rng)
        return x + self.mlp(self.mlp_norm(x), mlp_rng)


class ModernBertModel(PreTrainedModel):
    """The encoder: ``embeddings``, ``layers``, ``final_norm``.

    >>> from transformers import ModernBertConfig
    >>> config = ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    ...                           num_attention_heads=4, local_attention=4)
    >>> ModernBertModel.from_config(config)(input_ids=[[1, 5, 7, 2]]).last_hidden_state.shape
    (1, 4, 32)
    """

    base_model_prefix: ClassVar[str] = "model"
    # a masked-LM checkpoint's head and decoder (the Hub's ModernBERT checkpoints are ModernBertForMaskedLM)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"head\..*", r"decoder\..*")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.layer_types = check_config(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = ModernBertEmbeddings(config, **kw)
        self.layers = nnx.List([ModernBertEncoderLayer(config, i, **kw) for i in range(config.num_hidden_layers)])
        self.final_norm = _norm(config, **kw)
        ropes = modernbert_rope_parameters(config)
        head_dim = config.hidden_size // config.num_attention_heads
        # static data, not state: (layer type, its RoPE, its reach either side) for the types used
        self.kinds = tuple((t, rotary_of(config, ropes[t], head_dim),
                            config.local_attention // 2 if t == "sliding_attention" else None)
                           for t in sorted(set(self.layer_types)))

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 dropout_rng=None) -> ModelOutput:
        """``last_hidden_state`` ``[batch, seq, hidden]``; ``attention_mask`` 1 on real tokens;
        ``position_ids`` default ``0 .. seq-1``; ``dropout_rng`` applies the config's dropout."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.tok_embeddings(jnp.asarray(input_ids))
        x = jnp.asarray(inputs_embeds)
        b, s, _ = x.shape
        key_mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        positions = jnp.broadcast_to(jnp.arange(s), (b, s)) if position_ids is None else jnp.asarray(position_ids)
        emb_rng, layers_rng = split_keys(dropout_rng, 2)
        x = self.embeddings(x, emb_rng)
        distance = jnp.abs(jnp.arange(s)[:, None] - jnp.arange(s)[None, :])
        per_kind = {}
        for t, rope, reach in self.kinds:
            mask = key_mask[:, None, None, :]
            if reach is not None:
                mask = mask & (distance <= reach)[None, None]
            per_kind[t] = (*rope.cos_sin(positions, x.dtype), mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, *per_kind[self.layer_types[i]], layer_key(layers_rng, i))
        return ModelOutput(last_hidden_state=self.final_norm(x))


class ModernBertPredictionHead(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        self.dense = nnx.Linear(h, h, use_bias=bool(config.classifier_bias), **_kw(config, dtype, param_dtype, rngs))
        self.act = config.classifier_activation
        self.norm = _norm(config, dtype, param_dtype, rngs)

    def __call__(self, x):
        return self.norm(ACTIVATIONS[self.act](self.dense(x)))


class _ModernBertTask(PreTrainedModel):
    """``model`` (the encoder), ``head``, dropout and a linear ``classifier``."""

    base_model_prefix: ClassVar[str] = "model"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)", r"head\..*")
    ignored_keys: ClassVar[tuple[str, ...]] = (r"decoder\..*",)
    out_features: ClassVar[int | None] = None  # None: num_labels

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.model = ModernBertModel(config, **kw)
        self.head = ModernBertPredictionHead(config, **kw)
        self.rate = float(config.classifier_dropout)
        self.classifier = nnx.Linear(config.hidden_size, self.out_features or config.num_labels,
                                     **_kw(config, dtype, param_dtype, rngs))

    def _logits(self, input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng, pool: bool,
                first_real: bool = False):
        """``pool``: one row of logits per sequence (``classifier_pooling``), else per token;
        ``first_real``: ``"cls"`` pooling reads each row's first real token (transformers'
        multiple-choice head, left padding too), not its first position."""
        model_rng, head_rng = split_keys(dropout_rng, 2)
        h = self.model(input_ids, attention_mask, position_ids, inputs_embeds, model_rng).last_hidden_state
        if pool and self.config.classifier_pooling == "cls" and first_real and attention_mask is not None:
            first = jnp.argmax(jnp.asarray(attention_mask), axis=-1)
            h = jnp.take_along_axis(h, first[:, None, None], axis=1)[:, 0]
        elif pool and self.config.classifier_pooling == "cls":
            h = h[:, 0]
        elif pool:
            m = (jnp.ones(h.shape[:2]) if attention_mask is None else jnp.asarray(attention_mask)).astype(h.dtype)
            h = jnp.einsum("bs,bsh->bh", m, h) / m.sum(axis=1, keepdims=True)
        return self.classifier(dropout(self.head(h), self.rate, head_rng))


class ModernBertForSequenceClassification(_ModernBertTask):
    """A label per row, from the ``[CLS]`` token or the mean of the real tokens (``classifier_pooling``)."""

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                 dropout_rng=None) -> ModelOutput:
        logits = self._logits(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng, pool=True)
        loss = None if labels is None else sequence_classification_loss(logits, jnp.asarray(labels), self.config)
        return ModelOutput(logits=logits, loss=loss)


class ModernBertForTokenClassification(_ModernBertTask):
    """A label per token (named entities, tags); ``labels`` ``-100`` where none counts."""

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                 dropout_rng=None) -> ModelOutput:
        logits = self._logits(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng, pool=False)
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels))


class ModernBertForQuestionAnswering(_ModernBertTask):
    """A start and an end logit per token (extractive question answering)."""

    out_features: ClassVar[int | None] = 2

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 start_positions=None, end_positions=None, dropout_rng=None) -> ModelOutput:
        logits = self._logits(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng, pool=False)
        return ModelOutput(**span_outputs(logits, start_positions, end_positions))


class ModernBertForMultipleChoice(MultipleChoice, _ModernBertTask):
    """One score per choice (its first real token's state, or the mean of its real tokens, by
    ``classifier_pooling``): inputs ``[batch, choices, seq]``, logits ``[batch, choices]``.
    ModernBERT has no token types (``token_type_ids`` is refused)."""

    out_features: ClassVar[int | None] = 1

    def choice_logits(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng):
        if token_type_ids is not None:
            raise ValueError("ModernBertForMultipleChoice takes no token_type_ids (ModernBERT has no token types); "
                             "tokenize without them (return_token_type_ids=False)")
        return self._logits(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng, pool=True,
                            first_real=True)[:, 0]


class ModernBertDecoder(MaskedLMHead):
    """``decoder``: the token embeddings' transpose (tied) plus a ``bias`` where ``decoder_bias``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=bool(config.decoder_bias))

    def __call__(self, x, word_embeddings):
        return self.decode(x, word_embeddings)


class ModernBertForMaskedLM(PreTrainedModel):
    """Masked language modelling, as transformers': ``model``, ``head`` (``dense``, activation,
    ``norm``) and ``decoder`` (the token embeddings' transpose plus a bias); the Hub's ModernBERT
    checkpoints are this class's. ``labels`` (-100 where no token is predicted) add the mean
    cross entropy over the labelled tokens. With ``sparse_prediction`` transformers returns the
    labelled positions' logits only; here the logits are every position's (the loss is the same)."""

    base_model_prefix: ClassVar[str] = "model"
    optional_keys: ClassVar[tuple[str, ...]] = (r"head\..*", r"decoder\.bias")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        check_tied_decoder(self, self.config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.model = ModernBertModel(self.config, **kw)
        self.head = ModernBertPredictionHead(self.config, **kw)
        self.decoder = ModernBertDecoder(self.config, **kw)

    def _tied(self, key: str) -> bool:
        return key == "decoder.weight"

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                 dropout_rng=None) -> ModelOutput:
        """``[batch, seq, vocab]`` logits; ``labels`` add the loss over the labelled tokens."""
        h = self.model(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng).last_hidden_state
        logits = self.decoder(self.head(h), self.model.embeddings.tok_embeddings)
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels), last_hidden_state=h)


register(ModernBertModel, model_types=("modernbert",), default=True)
for _cls in (ModernBertForSequenceClassification, ModernBertForTokenClassification, ModernBertForQuestionAnswering,
             ModernBertForMaskedLM, ModernBertForMultipleChoice):
    register(_cls)
