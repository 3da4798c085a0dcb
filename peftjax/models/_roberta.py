"""RoBERTa and XLM-RoBERTa encoders in Flax NNX, with transformers' module names.

BERT's layers (``peftjax.models._bert``) with fairseq's positions and RoBERTa's classification
head. Positions count real tokens only and start after the padding index: a token's position is
``padding_idx + 1 + (real tokens before it)``, padding sits at ``padding_idx``, so left and right
padding give a sequence the same positions (transformers' ``create_position_ids_from_input_ids``;
its classification head reads column 0 all the same, so classify right-padded rows).
Embeddings passed in place of ids are numbered ``padding_idx + 1 ..`` whatever they hold, as
transformers numbers them. The sequence classifier reads the first token (``<s>``) through
``dense``, ``tanh`` and ``out_proj``, with dropout before each linear; there is no pooler.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._bert import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    MaskedLMHead,
    linear_kw,
)
from peftjax.models._dropout import dropout
from peftjax.models._losses import sequence_classification_loss
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import split_keys

# non-persistent buffers some checkpoints still carry, and the pre-training (masked LM) head
IGNORED_KEYS = (r"(roberta\.)?embeddings\.(position_ids|token_type_ids)", r"lm_head\..*")


class RobertaModel(BertModel):
    """The RoBERTa encoder: ``embeddings``, ``encoder.layer``, and the ``pooler`` unless dropped
    (the Hub's RoBERTa checkpoints have none: it is then newly initialised, as in transformers).

    >>> from transformers import RobertaConfig
    >>> config = RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                        intermediate_size=37, max_position_embeddings=40)
    >>> model = RobertaModel.from_config(config)
    >>> model(input_ids=[[0, 5, 7, 2, 1]], attention_mask=[[1, 1, 1, 1, 0]]).last_hidden_state.shape
    (1, 5, 32)
    """

    base_model_prefix: ClassVar[str] = "roberta"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    padding_idx: ClassVar[int | None] = None  # positions start after it; None: the config's pad_token_id

    def default_position_ids(self, input_ids, shape: tuple[int, int], n_prefix: int, segment_ids) -> jax.Array:
        """fairseq's positions (see the module docstring); after a prefix of ``V`` entries the
        count starts at ``V``, as after transformers' cache; in packed rows it restarts at each
        sequence."""
        b, s = shape
        pad = self.config.pad_token_id if self.padding_idx is None else self.padding_idx
        limit = self.config.max_position_embeddings
        if input_ids is None:  # embeddings: numbered in order, padding or not (and no prefix offset)
            if pad + s >= limit:
                raise ValueError(f"sequence length {s} exceeds the {limit - pad - 1} positions max_position_embeddings "
                                 f"{limit} leaves after the padding index {pad}")
            return jnp.broadcast_to(pad + 1 + jnp.arange(s), (b, s))
        if segment_ids is None and pad + n_prefix + s >= limit:
            after = f" after a prefix of {n_prefix}" if n_prefix else ""
            raise ValueError(f"sequence length {s}{after} exceeds the {limit - pad - 1} positions "
                             f"max_position_embeddings {limit} leaves after the padding index {pad}")
        real = (input_ids != pad).astype(jnp.int32)
        # each packed sequence counts from its own first token
        count = jnp.cumsum(real, axis=1) if segment_ids is None else attn.segment_cumsum(real, segment_ids)
        return (count + n_prefix) * real + pad


class RobertaClassificationHead(nnx.Module):
    """transformers' ``RobertaClassificationHead``: dropout, ``dense``, tanh, dropout, ``out_proj``."""

    activation: ClassVar[str] = "tanh"  # ELECTRA's head: GELU

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h = config.hidden_size
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.dense = nnx.Linear(h, h, **kw)
        self.out_proj = nnx.Linear(h, config.num_labels, **kw)
        rate = getattr(config, "classifier_dropout", None)
        self.dropout_rate = float(config.hidden_dropout_prob if rate is None else rate)

    def __call__(self, first_tokens, rng=None):
        """``[n, hidden]`` first-token states -> ``[n, num_labels]`` logits."""
        before, after = split_keys(rng, 2)
        x = ACTIVATIONS[self.activation](self.dense(dropout(first_tokens, self.dropout_rate, before)))
        return self.out_proj(dropout(x, self.dropout_rate, after))


class RobertaForSequenceClassification(PreTrainedModel):
    """``roberta`` (without a pooler) and the ``classifier`` head on each sequence's ``<s>`` token."""

    base_model_prefix: ClassVar[str] = "roberta"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(dense|out_proj)\.(weight|bias)",)
    # a checkpoint saved with a pooler (RobertaModel) loads here without it, as in transformers
    ignored_keys: ClassVar[tuple[str, ...]] = (*IGNORED_KEYS, r"(roberta\.)?pooler\..*")
    backbone_class: ClassVar[type[RobertaModel]] = RobertaModel
    head_class: ClassVar[type[RobertaClassificationHead]] = RobertaClassificationHead

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # the encoder, held under base_model_prefix (``roberta``; ELECTRA's subclass: ``electra``)
        setattr(self, self.base_model_prefix, self.backbone_class(config, add_pooling_layer=False, **kw))
        self.classifier = self.head_class(config, **kw)

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

        ``prefix_kv``, ``segment_ids`` and ``segment_starts``: as for :class:`RobertaModel`; packed
        rows with ``segment_starts`` give one row of logits per sequence (``labels`` likewise). The
        last layer computes only the ``<s>`` positions the head reads.
        """
        base_rng, head_rng = split_keys(dropout_rng, 2)
        backbone = getattr(self, self.base_model_prefix)
        first = backbone.first_token_states(input_ids, attention_mask, token_type_ids, position_ids,
                                            inputs_embeds, base_rng, prefix_kv, segment_ids, segment_starts)
        logits = self.classifier(first, head_rng)
        loss = None if labels is None else sequence_classification_loss(logits, jnp.asarray(labels), self.config)
        return ModelOutput(logits=logits, loss=loss)


class RobertaForTokenClassification(BertForTokenClassification):
    """``roberta`` (without a pooler), dropout, and a linear ``classifier`` on every token."""

    base_model_prefix: ClassVar[str] = "roberta"
    ignored_keys: ClassVar[tuple[str, ...]] = (*IGNORED_KEYS, r"(roberta\.)?pooler\..*")
    backbone_class: ClassVar[type[RobertaModel]] = RobertaModel


class RobertaForQuestionAnswering(BertForQuestionAnswering):
    """``roberta`` (without a pooler) and a linear ``qa_outputs``: a start and an end logit per token."""

    base_model_prefix: ClassVar[str] = "roberta"
    ignored_keys: ClassVar[tuple[str, ...]] = (*IGNORED_KEYS, r"(roberta\.)?pooler\..*")
    backbone_class: ClassVar[type[RobertaModel]] = RobertaModel


class RobertaForMultipleChoice(BertForMultipleChoice):
    """``roberta`` (with its pooler), dropout, and a linear ``classifier`` scoring each choice's pooled
    ``<s>``: BERT's multiple-choice head, as transformers' (not RoBERTa's sequence-classification head)."""

    base_model_prefix: ClassVar[str] = "roberta"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    backbone_class: ClassVar[type[RobertaModel]] = RobertaModel


class RobertaLMHead(MaskedLMHead):
    """``lm_head``: ``dense``, GELU, ``layer_norm``, then the tied decoder with its ``bias``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h = config.hidden_size
        self.dense = nnx.Linear(h, h, **linear_kw(config, dtype, param_dtype, rngs))
        self.layer_norm = nnx.LayerNorm(h, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                        rngs=rngs)

    def __call__(self, x, word_embeddings):
        return self.decode(self.layer_norm(ACTIVATIONS["gelu"](self.dense(x))), word_embeddings)


class RobertaForMaskedLM(BertForMaskedLM):
    """Masked language modelling: ``roberta`` (without a pooler) and ``lm_head`` (``dense``, GELU,
    ``layer_norm``, the word embeddings' transpose plus ``bias``), as transformers'; the Hub's
    RoBERTa and XLM-R checkpoints are this class's."""

    base_model_prefix: ClassVar[str] = "roberta"
    optional_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.(bias|dense\..*|layer_norm\..*)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*IGNORED_KEYS, r"(roberta\.)?pooler\..*")
    tied_keys: ClassVar[tuple[str, ...]] = ("lm_head.decoder.weight", "lm_head.decoder.bias")
    backbone_class: ClassVar[type[RobertaModel]] = RobertaModel

    def build_head(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.lm_head = RobertaLMHead(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def head(self, h: jax.Array) -> jax.Array:
        return self.lm_head(h, self.roberta.embeddings.word_embeddings)


class XLMRobertaModel(RobertaModel):
    """XLM-RoBERTa's encoder: RoBERTa's, under transformers' XLM-R class name."""


class XLMRobertaForSequenceClassification(RobertaForSequenceClassification):
    """XLM-RoBERTa's sequence classifier: RoBERTa's, under transformers' XLM-R class name."""

    backbone_class: ClassVar[type[RobertaModel]] = XLMRobertaModel


class XLMRobertaForTokenClassification(RobertaForTokenClassification):
    """XLM-RoBERTa's token classifier: RoBERTa's, under transformers' XLM-R class name."""

    backbone_class: ClassVar[type[RobertaModel]] = XLMRobertaModel


class XLMRobertaForQuestionAnswering(RobertaForQuestionAnswering):
    """XLM-RoBERTa's question-answering head: RoBERTa's, under transformers' XLM-R class name."""

    backbone_class: ClassVar[type[RobertaModel]] = XLMRobertaModel


class XLMRobertaForMaskedLM(RobertaForMaskedLM):
    """XLM-RoBERTa's masked LM: RoBERTa's, under transformers' XLM-R class name."""

    backbone_class: ClassVar[type[RobertaModel]] = XLMRobertaModel


class XLMRobertaForMultipleChoice(RobertaForMultipleChoice):
    """XLM-RoBERTa's multiple-choice head: RoBERTa's, under transformers' XLM-R class name."""

    backbone_class: ClassVar[type[RobertaModel]] = XLMRobertaModel


class CamembertModel(RobertaModel):
    """CamemBERT's encoder (``model_type`` ``"camembert"``): RoBERTa's, under transformers' CamemBERT class name."""


class CamembertForSequenceClassification(RobertaForSequenceClassification):
    backbone_class: ClassVar[type[RobertaModel]] = CamembertModel


class CamembertForTokenClassification(RobertaForTokenClassification):
    backbone_class: ClassVar[type[RobertaModel]] = CamembertModel


class CamembertForQuestionAnswering(RobertaForQuestionAnswering):
    backbone_class: ClassVar[type[RobertaModel]] = CamembertModel


class CamembertForMaskedLM(RobertaForMaskedLM):
    backbone_class: ClassVar[type[RobertaModel]] = CamembertModel


class CamembertForMultipleChoice(RobertaForMultipleChoice):
    backbone_class: ClassVar[type[RobertaModel]] = CamembertModel


register(RobertaModel, model_types=("roberta",), default=True)
register(RobertaForSequenceClassification)
register(RobertaForTokenClassification)
register(RobertaForQuestionAnswering)
register(RobertaForMaskedLM)
register(XLMRobertaModel, model_types=("xlm-roberta",), default=True)
register(XLMRobertaForSequenceClassification)
register(XLMRobertaForTokenClassification)
register(XLMRobertaForQuestionAnswering)
register(XLMRobertaForMaskedLM)
register(RobertaForMultipleChoice)
register(XLMRobertaForMultipleChoice)
register(CamembertModel, model_types=("camembert",), default=True)
register(CamembertForSequenceClassification)
register(CamembertForTokenClassification)
register(CamembertForQuestionAnswering)
register(CamembertForMaskedLM)
register(CamembertForMultipleChoice)
