"""ELECTRA's discriminator (``model_type`` ``"electra"``) in Flax NNX, with transformers' module names.

BERT's encoder (``peftjax.models._bert``) under ``electra``, with embeddings ``embedding_size``
wide (their LayerNorm too), projected to the hidden size by ``embeddings_project`` where the two
differ, and no pooler. The sequence classifier is RoBERTa's head with GELU in place of tanh
(dropout, ``dense``, GELU, dropout, ``out_proj`` on the first token); the token classifier and
question answering are BERT's. The Hub's checkpoints (``ElectraForPreTraining``, the
discriminator) load as that class, its replaced-token head included, and into each task's, their
``discriminator_predictions`` ignored and the head new, as in transformers.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._bert import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    MaskedLMHead,
    linear_kw,
)
from peftjax.models._dropout import dropout
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._multiple_choice import MultipleChoice
from peftjax.models._outputs import ModelOutput
from peftjax.models._roberta import RobertaClassificationHead, RobertaForSequenceClassification
from peftjax.nn._activations import ACTIVATIONS, activation
from peftjax.nn._dropout import split_keys

# non-persistent buffers, the discriminator's and the generator's pre-training heads
IGNORED_KEYS = (r"(electra\.)?embeddings\.(position_ids|token_type_ids)", r"discriminator_predictions\..*",
                r"generator_predictions\..*", r"generator_lm_head\..*")


class ElectraModel(BertModel):
    """The ELECTRA encoder: ``embeddings`` (``embedding_size`` wide), ``embeddings_project`` when
    that is not the hidden size, ``encoder.layer``; no pooler.

    >>> from transformers import ElectraConfig
    >>> config = ElectraConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2,
    ...                        num_attention_heads=4, intermediate_size=37)
    >>> ElectraModel.from_config(config)(input_ids=[[2, 5, 7]]).last_hidden_state.shape
    (1, 3, 32)
    """

    base_model_prefix: ClassVar[str] = "electra"
    optional_keys: ClassVar[tuple[str, ...]] = ()
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS

    def __init__(self, config, *, add_pooling_layer: bool | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        """``add_pooling_layer`` is accepted for BERT's signature; ELECTRA has no pooler."""
        super().__init__(config, add_pooling_layer=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e = self.embedding_width(self.config)
        self.embeddings_project = nnx.data(None)
        if e != self.config.hidden_size:
            self.embeddings_project = nnx.Linear(e, self.config.hidden_size,
                                                 **linear_kw(self.config, dtype, param_dtype, rngs))

    def embedding_width(self, config) -> int:
        return getattr(config, "embedding_size", None) or config.hidden_size

    def project_embeddings(self, x: jax.Array) -> jax.Array:
        return x if self.embeddings_project is None else self.embeddings_project(x)


class ElectraClassificationHead(RobertaClassificationHead):
    """transformers' ``ElectraClassificationHead``: RoBERTa's with GELU."""

    activation: ClassVar[str] = "gelu"


class ElectraForSequenceClassification(RobertaForSequenceClassification):
    """``electra`` and the ``classifier`` head (``dense``, GELU, ``out_proj``) on each sequence's
    first token; packed rows and prefixes as RoBERTa's."""

    base_model_prefix: ClassVar[str] = "electra"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    backbone_class: ClassVar[type[BertModel]] = ElectraModel
    head_class: ClassVar[type[RobertaClassificationHead]] = ElectraClassificationHead


class ElectraForTokenClassification(BertForTokenClassification):
    """``electra``, dropout (``classifier_dropout``, else ``hidden_dropout_prob``) and ``classifier``."""

    base_model_prefix: ClassVar[str] = "electra"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    backbone_class: ClassVar[type[BertModel]] = ElectraModel


class ElectraForQuestionAnswering(BertForQuestionAnswering):
    """``electra`` and ``qa_outputs``: a start and an end logit per token."""

    base_model_prefix: ClassVar[str] = "electra"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    backbone_class: ClassVar[type[BertModel]] = ElectraModel



class ElectraGeneratorPredictions(nnx.Module):
    """The generator's ``generator_predictions``: ``dense`` down to the embeddings' width, GELU,
    ``LayerNorm``."""

    def __init__(self, config, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = nnx.Linear(config.hidden_size, width, **linear_kw(config, dtype, param_dtype, rngs))
        self.LayerNorm = nnx.LayerNorm(width, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)

    def __call__(self, x):
        return self.LayerNorm(ACTIVATIONS["gelu"](self.dense(x)))


class ElectraGeneratorLMHead(MaskedLMHead):
    """``generator_lm_head``: the word embeddings' transpose (tied, as transformers ties it) plus
    its ``bias``."""

    def __call__(self, x, word_embeddings):
        return self.decode(x, word_embeddings)


class ElectraForMaskedLM(BertForMaskedLM):
    """ELECTRA's generator (the Hub's ``...-generator`` checkpoints): ``electra``, then
    ``generator_predictions`` and ``generator_lm_head`` (tied to the word embeddings, with its own
    bias): ``[batch, seq, vocab]`` logits, ``labels`` as BERT's masked LM."""

    base_model_prefix: ClassVar[str] = "electra"
    optional_keys: ClassVar[tuple[str, ...]] = (r"generator_predictions\..*", r"generator_lm_head\.bias")
    # a discriminator checkpoint's head is not this model's
    ignored_keys: ClassVar[tuple[str, ...]] = (r"(electra\.)?embeddings\.(position_ids|token_type_ids)",
                                               r"discriminator_predictions\..*")
    tied_keys: ClassVar[tuple[str, ...]] = ("generator_lm_head.weight",)
    backbone_class: ClassVar[type[BertModel]] = ElectraModel

    def build_head(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        width = self.electra.embedding_width(self.config)
        self.generator_predictions = ElectraGeneratorPredictions(self.config, width, dtype=dtype,
                                                                 param_dtype=param_dtype, rngs=rngs)
        self.generator_lm_head = ElectraGeneratorLMHead(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def head(self, h: jax.Array) -> jax.Array:
        return self.generator_lm_head(self.generator_predictions(h), self.electra.embeddings.word_embeddings)


class ElectraSequenceSummary(nnx.Module):
    """transformers' ``ElectraSequenceSummary``: each sequence's ``summary_type`` state (its first
    token, its last position, or the mean over every position, padding included, as transformers
    takes it), ``summary_first_dropout``, the ``summary`` projection (``summary_use_proj``: to the
    hidden size, or to ``num_labels`` with ``summary_proj_to_labels``), ``summary_activation``,
    ``summary_last_dropout``."""

    TYPES: ClassVar[tuple[str, ...]] = ("first", "last", "mean")

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.kind = getattr(config, "summary_type", "last")
        if self.kind not in self.TYPES:
            raise ValueError(f"summary_type {self.kind!r} is not supported; supported: {list(self.TYPES)}")
        self.summary = nnx.data(None)
        if getattr(config, "summary_use_proj", False):
            to_labels = getattr(config, "summary_proj_to_labels", False) and config.num_labels > 0
            width = config.num_labels if to_labels else config.hidden_size
            self.summary = nnx.Linear(config.hidden_size, width, **linear_kw(config, dtype, param_dtype, rngs))
        self.act = getattr(config, "summary_activation", None)
        if self.act:
            activation(self.act, "summary_activation")  # named where it is not supported
        self.first_rate = float(getattr(config, "summary_first_dropout", 0.0) or 0.0)
        self.last_rate = float(getattr(config, "summary_last_dropout", 0.0) or 0.0)

    def __call__(self, pooled: jax.Array, rng=None) -> jax.Array:
        first_rng, last_rng = split_keys(rng, 2)
        x = dropout(pooled, self.first_rate, first_rng)
        if self.summary is not None:
            x = self.summary(x)
        if self.act:
            x = activation(self.act, "summary_activation")(x)
        return dropout(x, self.last_rate, last_rng)


class ElectraForMultipleChoice(MultipleChoice, PreTrainedModel):
    """``electra``, ``sequence_summary`` and a one-score ``classifier`` per choice: inputs
    ``[batch, choices, seq]``, logits ``[batch, choices]``."""

    base_model_prefix: ClassVar[str] = "electra"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",
                                                r"sequence_summary\.summary\.(weight|bias)")
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.electra = ElectraModel(config, **kw)
        self.sequence_summary = ElectraSequenceSummary(config, **kw)
        self.classifier = nnx.Linear(config.hidden_size, 1, **linear_kw(config, dtype, param_dtype, rngs))

    def choice_logits(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng):
        base_rng, summary_rng = split_keys(dropout_rng, 2)
        if self.sequence_summary.kind == "first":  # the last layer computes the first tokens alone
            pooled = self.electra.first_token_states(input_ids, attention_mask, token_type_ids, position_ids,
                                                     inputs_embeds, base_rng)
        else:
            h = self.electra(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                             base_rng).last_hidden_state
            pooled = h[:, -1] if self.sequence_summary.kind == "last" else h.mean(axis=1)
        return self.classifier(self.sequence_summary(pooled, summary_rng))[:, 0]


class ElectraDiscriminatorPredictions(nnx.Module):
    """The discriminator's ``discriminator_predictions``: ``dense``, ``hidden_act``, then
    ``dense_prediction`` to one logit per token."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.dense = nnx.Linear(config.hidden_size, config.hidden_size, **kw)
        self.dense_prediction = nnx.Linear(config.hidden_size, 1, **kw)
        self.act = config.hidden_act
        activation(self.act, "hidden_act")  # named where it is not supported

    def __call__(self, h: jax.Array) -> jax.Array:
        return self.dense_prediction(activation(self.act, "hidden_act")(self.dense(h)))[..., 0]


class ElectraForPreTraining(PreTrainedModel):
    """ELECTRA's discriminator as the Hub ships it: ``electra``, then ``discriminator_predictions``,
    one logit per token that it was replaced (positive: replaced), ``[batch, seq]``. ``labels``
    (``[batch, seq]``, 1 for a replaced token, 0 for an original) add transformers' loss: the mean
    binary cross entropy over the positions ``attention_mask`` keeps (over all without one)."""

    base_model_prefix: ClassVar[str] = "electra"
    optional_keys: ClassVar[tuple[str, ...]] = (r"discriminator_predictions\..*",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"(electra\.)?embeddings\.(position_ids|token_type_ids)",
                                               r"generator_predictions\..*", r"generator_lm_head\..*")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.electra = ElectraModel(self.config, **kw)
        self.discriminator_predictions = ElectraDiscriminatorPredictions(self.config, **kw)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, labels=None, dropout_rng=None) -> ModelOutput:
        """``logits`` ``[batch, seq]`` (and ``loss`` with ``labels``); the encoder's states as
        ``last_hidden_state``."""
        h = self.electra(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                         dropout_rng).last_hidden_state
        logits = self.discriminator_predictions(h)
        loss = None
        if labels is not None:
            per_token = optax.sigmoid_binary_cross_entropy(logits, jnp.asarray(labels).astype(logits.dtype))
            keep = jnp.ones(logits.shape, bool) if attention_mask is None else jnp.asarray(attention_mask) == 1
            loss = jnp.sum(jnp.where(keep, per_token, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h)


register(ElectraModel, model_types=("electra",), default=True)
for _cls in (ElectraForSequenceClassification, ElectraForTokenClassification, ElectraForQuestionAnswering,
             ElectraForMultipleChoice, ElectraForMaskedLM, ElectraForPreTraining):
    register(_cls)
