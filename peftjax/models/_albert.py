"""ALBERT (``model_type`` ``"albert"``: albert-base/large/xlarge/xxlarge v1 and v2) in Flax NNX, under
transformers' names.

BERT's post-LayerNorm encoder (``_bert``) with ALBERT's two savings:

* factorised embeddings: ``embeddings`` at ``embedding_size`` (128), projected to the hidden size
  by ``encoder.embedding_hidden_mapping_in``;
* shared layers: ``encoder.albert_layer_groups`` holds ``num_hidden_groups`` groups (1 in every
  release) of ``inner_group_num`` layers (1), and the encoder runs ``num_hidden_layers`` steps, step
  ``i`` through group ``int(i / (num_hidden_layers / num_hidden_groups))``. An adapter on a shared
  layer is shared by every step that runs it, as PEFT's (one wrapped module).

A layer (``albert_layers.N``) is ``attention`` (``query``, ``key``, ``value``, ``dense`` and its
``LayerNorm`` after the residual add) then ``ffn``, ``hidden_act`` (``gelu_new``), ``ffn_output``
and ``full_layer_layer_norm`` after the residual add; dropout on the attention probabilities and
after ``dense`` (none after ``ffn_output``, as transformers). The pooler is one linear layer,
``pooler``, then tanh. The heads drop out ``classifier_dropout_prob`` (the token classifier
``hidden_dropout_prob`` when that is unset), as transformers'.

Not here: ``AlbertForPreTraining`` (a checkpoint's ``sop_classifier`` is ignored), ``scan_layers``
(the steps share their weights: nothing to stack), prefix tuning (transformers' ALBERT takes no
past keys and values)."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._bert import (
    BertEmbeddings,
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForTokenClassification,
    BertModel,
    BertSelfAttention,
    MaskedLMHead,
    _layer_norm,
    linear_kw,
    pick_rows,
)
from peftjax.models._dropout import dropout
from peftjax.models._losses import sequence_classification_loss
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import split_keys
from peftjax.nn._scan import check_remat, run_layers


def _head_dropout(config) -> float:
    """transformers' ALBERT heads: ``classifier_dropout_prob``, else ``hidden_dropout_prob``."""
    rate = getattr(config, "classifier_dropout_prob", None)
    return float(config.hidden_dropout_prob if rate is None else rate)


class AlbertAttention(BertSelfAttention):
    """``query``, ``key``, ``value``, then ``dense`` and ``LayerNorm(x + dense(attention))``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h = config.hidden_size
        self.dense = nnx.Linear(h, h, **linear_kw(config, dtype, param_dtype, rngs))
        self.LayerNorm = _layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output_dropout_rate = float(config.hidden_dropout_prob)

    def __call__(self, x, mask, rng=None):
        attn_rng, out_rng = split_keys(rng, 2)
        a = super().__call__(x, mask, attn_rng)
        return self.LayerNorm(x + dropout(self.dense(a), self.output_dropout_rate, out_rng))


class AlbertLayer(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lin = linear_kw(config, dtype, param_dtype, rngs)
        self.full_layer_layer_norm = _layer_norm(config, **kw)
        self.attention = AlbertAttention(config, **kw)
        self.ffn = nnx.Linear(config.hidden_size, config.intermediate_size, **lin)
        self.ffn_output = nnx.Linear(config.intermediate_size, config.hidden_size, **lin)
        self.hidden_act = config.hidden_act

    def __call__(self, x, mask, rng=None):
        a = self.attention(x, mask, rng)
        return self.full_layer_layer_norm(self.ffn_output(ACTIVATIONS[self.hidden_act](self.ffn(a))) + a)


class AlbertLayerGroup(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.albert_layers = nnx.List([AlbertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                       for _ in range(config.inner_group_num)])


class AlbertTransformer(nnx.Module):
    """``embedding_hidden_mapping_in`` and the shared ``albert_layer_groups``, run
    ``num_hidden_layers`` steps (each under ``remat``, a model option)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.remat = check_remat(getattr(config, "remat", "none"))
        self.embedding_hidden_mapping_in = nnx.Linear(config.embedding_size, config.hidden_size,
                                                      **linear_kw(config, dtype, param_dtype, rngs))
        self.albert_layer_groups = nnx.List([AlbertLayerGroup(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                             for _ in range(config.num_hidden_groups)])
        self.num_hidden_layers = config.num_hidden_layers

    def steps(self) -> list[AlbertLayer]:
        """The layer each step runs, in order (the shared ones repeated), as transformers picks them."""
        n, groups = self.num_hidden_layers, len(self.albert_layer_groups)
        return [layer for i in range(n) for layer in self.albert_layer_groups[int(i / (n / groups))].albert_layers]

    def __call__(self, x, mask, rng=None, prefix_kv=None, rows=None):
        """The last step's output ``[batch, seq, hidden]``, or with ``rows`` (``[n]`` flat indices)
        those positions', ``[n, hidden]``."""
        h = run_layers(self.steps(), lambda layer, h, k: layer(h, mask, k), self.embedding_hidden_mapping_in(x),
                       self.remat, rng)
        return h if rows is None else pick_rows(h.reshape(-1, h.shape[-1]), rows)


class AlbertModel(BertModel):
    """The ALBERT encoder: ``embeddings`` (``embedding_size`` wide), ``encoder`` and, unless dropped,
    the one-linear ``pooler`` (tanh)."""

    base_model_prefix: ClassVar[str] = "albert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"pooler\.(weight|bias)",)
    embeddings_class: ClassVar[type[nnx.Module]] = BertEmbeddings
    encoder_class: ClassVar[type[nnx.Module]] = AlbertTransformer
    ignored_keys: ClassVar[tuple[str, ...]] = (r"(albert\.)?embeddings\.(position_ids|token_type_ids)",
                                               r"predictions\..*", r"sop_classifier\..*")

    def __init__(self, config, *, add_pooling_layer: bool | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if getattr(config, "scan_layers", False):
            raise ValueError("albert: scan_layers=True is not supported (its steps share one layer's weights: "
                             "nothing to stack)")
        groups, n = config.num_hidden_groups, config.num_hidden_layers
        if not 1 <= groups <= n:
            raise ValueError(f"albert: num_hidden_groups={groups} must be between 1 and num_hidden_layers={n}")
        super().__init__(config, add_pooling_layer=add_pooling_layer, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
        if self.pooler is not None:
            h = config.hidden_size
            self.pooler = nnx.Linear(h, h, **linear_kw(config, dtype, param_dtype, rngs))

    def embedding_width(self, config) -> int:
        return config.embedding_size

    @staticmethod
    def _refuse_prefix(prefix_kv) -> None:
        if prefix_kv is not None:
            raise ValueError("AlbertModel: prefix tuning (prefix_kv) is not supported: transformers' ALBERT takes no "
                             "past keys and values")

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, dropout_rng=None, prefix_kv=None, segment_ids=None, segment_starts=None,
                 output_last_hidden_state: bool = True) -> ModelOutput:
        """As :meth:`BertModel.__call__`, without ``prefix_kv``."""
        self._refuse_prefix(prefix_kv)
        first_only = self.pooler is not None and not output_last_hidden_state
        h, first = self._encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng,
                                None, segment_ids, segment_starts, first_only=first_only)
        pooled = None if self.pooler is None else jnp.tanh(self.pooler(first))
        return ModelOutput(last_hidden_state=h, pooler_output=pooled)

    def first_token_states(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                           inputs_embeds=None, dropout_rng=None, prefix_kv=None, segment_ids=None,
                           segment_starts=None):
        self._refuse_prefix(prefix_kv)
        return super().first_token_states(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                                          dropout_rng, None, segment_ids, segment_starts)


class AlbertForSequenceClassification(PreTrainedModel):
    """``albert`` (with its pooler), dropout, and a linear ``classifier`` on the pooled ``[CLS]``."""

    base_model_prefix: ClassVar[str] = "albert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)", r"albert\.pooler\.(weight|bias)")
    ignored_keys: ClassVar[tuple[str, ...]] = AlbertModel.ignored_keys

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.albert = AlbertModel(config, add_pooling_layer=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = _head_dropout(config)
        self.classifier = nnx.Linear(config.hidden_size, config.num_labels,
                                     **linear_kw(config, dtype, param_dtype, rngs))

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, labels=None, dropout_rng=None, prefix_kv=None, segment_ids=None,
                 segment_starts=None) -> ModelOutput:
        """As :meth:`BertForSequenceClassification.__call__` (packed rows too), without ``prefix_kv``."""
        base_rng, head_rng = split_keys(dropout_rng, 2)
        out = self.albert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, base_rng, prefix_kv,
                          segment_ids, segment_starts, output_last_hidden_state=False)
        logits = self.classifier(dropout(out.pooler_output, self.dropout_rate, head_rng))
        loss = None if labels is None else sequence_classification_loss(logits, jnp.asarray(labels), self.config)
        return ModelOutput(logits=logits, loss=loss, pooler_output=out.pooler_output)


class AlbertForTokenClassification(BertForTokenClassification):
    base_model_prefix: ClassVar[str] = "albert"
    ignored_keys: ClassVar[tuple[str, ...]] = (*AlbertModel.ignored_keys, r"(albert\.)?pooler\..*")
    backbone_class: ClassVar[type[BertModel]] = AlbertModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = _head_dropout(self.config)


class AlbertForQuestionAnswering(BertForQuestionAnswering):
    base_model_prefix: ClassVar[str] = "albert"
    ignored_keys: ClassVar[tuple[str, ...]] = (*AlbertModel.ignored_keys, r"(albert\.)?pooler\..*")
    backbone_class: ClassVar[type[BertModel]] = AlbertModel


class AlbertForMultipleChoice(BertForMultipleChoice):
    base_model_prefix: ClassVar[str] = "albert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)", r"albert\.pooler\.(weight|bias)")
    ignored_keys: ClassVar[tuple[str, ...]] = AlbertModel.ignored_keys
    backbone_class: ClassVar[type[BertModel]] = AlbertModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = _head_dropout(self.config)


class AlbertMLMHead(MaskedLMHead):
    """``predictions``: ``dense`` (hidden to ``embedding_size``), the activation, ``LayerNorm``, then the
    word embeddings' transpose (the tied ``decoder``) plus ``bias``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.dense = nnx.Linear(config.hidden_size, config.embedding_size, **kw)
        self.LayerNorm = nnx.LayerNorm(config.embedding_size, epsilon=config.layer_norm_eps, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, x, word_embeddings):
        return self.decode(self.LayerNorm(ACTIVATIONS[self.hidden_act](self.dense(x))), word_embeddings)


class AlbertForMaskedLM(BertForMaskedLM):
    """Masked language modelling (the releases' class): ``albert`` without a pooler and ``predictions``
    (:class:`AlbertMLMHead`); as :class:`~peftjax.models.BertForMaskedLM` otherwise."""

    base_model_prefix: ClassVar[str] = "albert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"predictions\.(bias|dense\..*|LayerNorm\..*)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"(albert\.)?embeddings\.(position_ids|token_type_ids)",
                                               r"sop_classifier\..*", r"(albert\.)?pooler\..*")
    tied_keys: ClassVar[tuple[str, ...]] = ("predictions.decoder.weight", "predictions.decoder.bias")
    backbone_class: ClassVar[type[BertModel]] = AlbertModel

    def build_head(self, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.predictions = AlbertMLMHead(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def head(self, h):
        return self.predictions(h, self.albert.embeddings.word_embeddings)


register(AlbertModel, model_types=("albert",), default=True)
register(AlbertForSequenceClassification)
register(AlbertForTokenClassification)
register(AlbertForQuestionAnswering)
register(AlbertForMultipleChoice)
register(AlbertForMaskedLM)
