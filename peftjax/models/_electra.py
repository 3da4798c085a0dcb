"""ELECTRA's discriminator (``model_type`` ``"electra"``) in Flax NNX, with transformers' module names.

BERT's encoder (``peftjax.models._bert``) under ``electra``, with embeddings ``embedding_size``
wide (their LayerNorm too), projected to the hidden size by ``embeddings_project`` where the two
differ, and no pooler. The sequence classifier is RoBERTa's head with GELU in place of tanh
(dropout, ``dense``, GELU, dropout, ``out_proj`` on the first token); the token classifier and
question answering are BERT's. The Hub's checkpoints (``ElectraForPreTraining``, the
discriminator) load into each, their ``discriminator_predictions`` ignored and the head new, as in
transformers.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._bert import BertForQuestionAnswering, BertForTokenClassification, BertModel, linear_kw
from peftjax.models._roberta import RobertaClassificationHead, RobertaForSequenceClassification

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


register(ElectraModel, model_types=("electra",), default=True)
for _cls in (ElectraForSequenceClassification, ElectraForTokenClassification, ElectraForQuestionAnswering):
    register(_cls)
