"""DistilBERT (``model_type`` ``"distilbert"``) in Flax NNX, with transformers' module names.

BERT's post-LayerNorm encoder, six layers by default, under other names and without token types
or a pooler: ``embeddings`` (``word_embeddings`` + ``position_embeddings``, ``LayerNorm``),
``transformer.layer.N`` with ``attention.{q_lin,k_lin,v_lin,out_lin}`` and ``sa_layer_norm``, then
``ffn.{lin1,lin2}`` (``activation``) and ``output_layer_norm``. Every LayerNorm's epsilon is 1e-12
(transformers fixes it: the config has no field for it). ``sinusoidal_pos_embds`` only chooses how
``from_config`` initialises the position table, as in transformers; a checkpoint holds the table.

Dropout runs only with a ``dropout_rng`` key, as torch's ``.train()``: ``dropout`` on the embeddings
and after ``ffn.lin2`` (none after ``out_lin``: transformers has none there), ``attention_dropout``
on the attention probabilities, and the heads' own (``seq_classif_dropout`` after the sequence
classifier's ``pre_classifier`` and ReLU, ``dropout`` before the token classifier, ``qa_dropout``
before ``qa_outputs``).

Not here, as in PEFT: prefix tuning. transformers' DistilBERT takes no cache, so PEFT refuses a
prefix adapter on its classifiers (and its bare model ignores one); these models take no ``prefix_kv``
and peftjax refuses it too. Prompt tuning and P-tuning (virtual tokens) work.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._bert import MaskedLMHead, absolute_position_ids, check_tied_decoder, linear_kw
from peftjax.models._dropout import dropout
from peftjax.models._losses import check_span_labels, sequence_classification_loss, span_outputs, token_labels_loss
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._multiple_choice import MultipleChoice
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import split_keys
from peftjax.nn._scan import check_remat, make_layers, run_layers

LAYER_NORM_EPS = 1e-12  # transformers' DistilBERT: every LayerNorm's, fixed
# non-persistent buffers older checkpoints carry, and the masked-LM head (the Hub's checkpoints are
# DistilBertForMaskedLM)
IGNORED_KEYS = (r"(distilbert\.)?embeddings\.position_ids", r"vocab_(transform|layer_norm|projector)\..*")


def _check_config(config) -> None:
    """Rejects what this implementation does not compute, before any weight is built."""
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"distilbert: activation {config.activation!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}")
    if config.dim % config.n_heads:
        raise ValueError(f"distilbert: dim {config.dim} is not a multiple of n_heads {config.n_heads}")


def sinusoidal_positions(key, shape, dtype=jnp.float32) -> jax.Array:
    """transformers' ``create_sinusoidal_embeddings``: position ``p``, column ``j`` holds
    ``sin`` (even ``j``) or ``cos`` (odd ``j``) of ``p / 10000 ** (2 * (j // 2) / dim)``; an
    ``embedding_init`` (``key`` unused)."""
    del key
    n_pos, dim = shape
    angles = np.arange(n_pos)[:, None] / np.power(10000, 2 * (np.arange(dim) // 2) / dim)[None, :]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
    return jnp.asarray(table.astype(np.float32), dtype)


def _layer_norm(config, dtype, param_dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.dim, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class DistilBertEmbeddings(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(config.vocab_size, config.dim, embedding_init=init, **kw)
        positions = sinusoidal_positions if config.sinusoidal_pos_embds else init
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.dim, embedding_init=positions,
                                             **kw)
        self.LayerNorm = _layer_norm(config, dtype, param_dtype, rngs)
        self.dropout_rate = float(config.dropout)

    def __call__(self, inputs_embeds, position_ids, rng=None):
        return dropout(self.LayerNorm(inputs_embeds + self.position_embeddings(position_ids)), self.dropout_rate, rng)


class DistilBertSelfAttention(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.n_heads
        self.head_dim = config.dim // config.n_heads
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.q_lin = nnx.Linear(config.dim, config.dim, **kw)
        self.k_lin = nnx.Linear(config.dim, config.dim, **kw)
        self.v_lin = nnx.Linear(config.dim, config.dim, **kw)
        self.out_lin = nnx.Linear(config.dim, config.dim, **kw)
        self.dropout_rate = float(config.attention_dropout)

    def __call__(self, x, mask, rng=None):
        """``[batch, seq, dim]``; ``mask`` boolean ``[batch, 1, seq, seq]`` (padded keys false)."""
        b, s, _ = x.shape
        q, k, v = (lin(x).reshape(b, s, self.num_heads, self.head_dim) for lin in (self.q_lin, self.k_lin, self.v_lin))
        out = attn.dot_product_attention(q, k, v, mask, scale=self.head_dim**-0.5, dropout_rate=self.dropout_rate,
                                         dropout_rng=rng)
        return self.out_lin(out.reshape(b, s, -1))


class DistilBertFFN(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.lin1 = nnx.Linear(config.dim, config.hidden_dim, **kw)
        self.lin2 = nnx.Linear(config.hidden_dim, config.dim, **kw)
        self.activation = config.activation
        self.dropout_rate = float(config.dropout)

    def __call__(self, x, rng=None):
        return dropout(self.lin2(ACTIVATIONS[self.activation](self.lin1(x))), self.dropout_rate, rng)


class DistilBertTransformerBlock(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = DistilBertSelfAttention(config, **kw)
        self.sa_layer_norm = _layer_norm(config, **kw)
        self.ffn = DistilBertFFN(config, **kw)
        self.output_layer_norm = _layer_norm(config, **kw)

    def __call__(self, x, mask, rng=None):
        attn_rng, ffn_rng = split_keys(rng, 2)
        a = self.sa_layer_norm(self.attention(x, mask, attn_rng) + x)
        return self.output_layer_norm(self.ffn(a, ffn_rng) + a)


class DistilBertTransformer(nnx.Module):
    """``layer``: the blocks, stacked and scanned with ``scan_layers=True`` (under ``remat``)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.remat = check_remat(getattr(config, "remat", "none"))
        self.layer = make_layers(
            config, lambda _, r: DistilBertTransformerBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=r),
            rngs=rngs)

    def __call__(self, x, mask, rng=None):
        return run_layers(self.layer, lambda layer, h, k: layer(h, mask, k), x, self.remat, rng)


class DistilBertModel(PreTrainedModel):
    """The DistilBERT encoder: ``embeddings`` and ``transformer.layer``.

    >>> from transformers import DistilBertConfig
    >>> config = DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    >>> model = DistilBertModel.from_config(config)
    >>> model(input_ids=[[2, 5, 7, 0]], attention_mask=[[1, 1, 1, 0]]).last_hidden_state.shape
    (1, 4, 32)
    """

    base_model_prefix: ClassVar[str] = "distilbert"
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        _check_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = DistilBertEmbeddings(config, **kw)
        self.transformer = DistilBertTransformer(config, **kw)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 dropout_rng=None) -> ModelOutput:
        """Encodes a batch: ``last_hidden_state`` ``[batch, seq, dim]``.

        Args:
          input_ids: ``[batch, seq]`` token ids (or pass ``inputs_embeds``).
          attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding (default: all 1).
          position_ids: ``[batch, seq]`` (default: ``0 .. seq-1``).
          inputs_embeds: ``[batch, seq, dim]`` word embeddings in place of ``input_ids``.
          dropout_rng: a ``jax.random`` key to apply dropout (training); ``None``: no dropout.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings.word_embeddings(jnp.asarray(input_ids))
        x = jnp.asarray(inputs_embeds)
        b, s, _ = x.shape
        if position_ids is None:
            position_ids = absolute_position_ids((b, s), 0, self.config.max_position_embeddings)
        key_mask = jnp.ones((b, s), bool) if attention_mask is None else jnp.asarray(attention_mask)
        mask = attn.attention_mask_4d(jnp.arange(s), key_mask, causal=False)
        emb_rng, layers_rng = split_keys(dropout_rng, 2)
        x = self.embeddings(x, jnp.asarray(position_ids), emb_rng)
        return ModelOutput(last_hidden_state=self.transformer(x, mask, layers_rng))


class _DistilBertFirstTokenHead(PreTrainedModel):
    """``distilbert``, then on each row's first token (``[CLS]``) ``pre_classifier``, ReLU, dropout
    (``seq_classif_dropout``) and ``classifier`` (``out_features`` wide; ``None``: ``num_labels``)."""

    base_model_prefix: ClassVar[str] = "distilbert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"(pre_classifier|classifier)\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS
    out_features: ClassVar[int | None] = None

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.distilbert = DistilBertModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = linear_kw(config, dtype, param_dtype, rngs)
        self.pre_classifier = nnx.Linear(config.dim, config.dim, **kw)
        self.classifier = nnx.Linear(config.dim, self.out_features or config.num_labels, **kw)
        self.dropout_rate = float(config.seq_classif_dropout)

    def _first_token_logits(self, input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng):
        base_rng, head_rng = split_keys(dropout_rng, 2)
        h = self.distilbert(input_ids, attention_mask, position_ids, inputs_embeds, base_rng).last_hidden_state
        return self.classifier(dropout(jax.nn.relu(self.pre_classifier(h[:, 0])), self.dropout_rate, head_rng))


class DistilBertForSequenceClassification(_DistilBertFirstTokenHead):
    """The first-token head's ``num_labels`` logits per row."""

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                 dropout_rng=None) -> ModelOutput:
        """Classifies a batch, ``[batch, num_labels]``; ``labels`` (``[batch]`` ints, floats for
        regression or ``[batch, num_labels]`` multi-label targets) add transformers' loss."""
        logits = self._first_token_logits(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng)
        loss = None if labels is None else sequence_classification_loss(logits, jnp.asarray(labels), self.config)
        return ModelOutput(logits=logits, loss=loss)


class DistilBertForMultipleChoice(MultipleChoice, _DistilBertFirstTokenHead):
    """The first-token head's one score per choice: inputs ``[batch, choices, seq]``, logits
    ``[batch, choices]``. DistilBERT has no token types (``token_type_ids`` is refused)."""

    out_features: ClassVar[int | None] = 1

    def choice_logits(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng):
        if token_type_ids is not None:
            raise ValueError("DistilBertForMultipleChoice takes no token_type_ids (DistilBERT has no token types); "
                             "tokenize without them (return_token_type_ids=False)")
        return self._first_token_logits(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng)[:, 0]


class DistilBertForTokenClassification(PreTrainedModel):
    """``distilbert``, dropout (``dropout``) and a linear ``classifier`` on every token."""

    base_model_prefix: ClassVar[str] = "distilbert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.distilbert = DistilBertModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = float(config.dropout)
        self.classifier = nnx.Linear(config.dim, config.num_labels, **linear_kw(config, dtype, param_dtype, rngs))

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                 dropout_rng=None) -> ModelOutput:
        """Classifies every token, ``[batch, seq, num_labels]``; ``labels`` (``[batch, seq]`` ints,
        ``-100`` where none counts) add the mean cross entropy over the labelled tokens."""
        base_rng, head_rng = split_keys(dropout_rng, 2)
        h = self.distilbert(input_ids, attention_mask, position_ids, inputs_embeds, base_rng).last_hidden_state
        logits = self.classifier(dropout(h, self.dropout_rate, head_rng))
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels))


class DistilBertForQuestionAnswering(PreTrainedModel):
    """``distilbert``, dropout (``qa_dropout``) and a linear ``qa_outputs``: a start and an end
    logit per token (``num_labels`` must be 2, as transformers requires)."""

    base_model_prefix: ClassVar[str] = "distilbert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"qa_outputs\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        check_span_labels(self, config)
        self.distilbert = DistilBertModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qa_outputs = nnx.Linear(config.dim, config.num_labels, **linear_kw(config, dtype, param_dtype, rngs))
        self.dropout_rate = float(config.qa_dropout)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                 start_positions=None, end_positions=None, dropout_rng=None) -> ModelOutput:
        """``start_logits`` and ``end_logits``, ``[batch, seq]``; ``start_positions`` and
        ``end_positions`` (``[batch]`` token indices) add transformers' loss (:func:`span_loss`)."""
        base_rng, head_rng = split_keys(dropout_rng, 2)
        h = self.distilbert(input_ids, attention_mask, position_ids, inputs_embeds, base_rng).last_hidden_state
        logits = self.qa_outputs(dropout(h, self.dropout_rate, head_rng))
        return ModelOutput(**span_outputs(logits, start_positions, end_positions))


class DistilBertVocabProjector(MaskedLMHead):
    """``vocab_projector``: the word embeddings' transpose (tied) plus its ``bias``."""

    def __call__(self, x, word_embeddings):
        return self.decode(x, word_embeddings)


class DistilBertForMaskedLM(PreTrainedModel):
    """Masked language modelling, as transformers': ``distilbert``, then ``vocab_transform``,
    ``activation``, ``vocab_layer_norm`` and ``vocab_projector`` (the word embeddings' transpose
    plus a bias); the Hub's DistilBERT checkpoints are this class's. ``labels`` (-100 where no
    token is predicted) add the mean cross entropy over the labelled tokens."""

    base_model_prefix: ClassVar[str] = "distilbert"
    optional_keys: ClassVar[tuple[str, ...]] = (r"vocab_(transform|layer_norm)\.(weight|bias)",
                                                r"vocab_projector\.bias")
    ignored_keys: ClassVar[tuple[str, ...]] = IGNORED_KEYS

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        check_tied_decoder(self, config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.distilbert = DistilBertModel(config, **kw)
        self.vocab_transform = nnx.Linear(config.dim, config.dim, **linear_kw(config, dtype, param_dtype, rngs))
        self.activation = config.activation
        self.vocab_layer_norm = _layer_norm(config, dtype, param_dtype, rngs)
        self.vocab_projector = DistilBertVocabProjector(config, **kw)

    def _tied(self, key: str) -> bool:
        return key == "vocab_projector.weight"

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                 dropout_rng=None) -> ModelOutput:
        """``[batch, seq, vocab]`` logits; ``labels`` add the loss over the labelled tokens."""
        h = self.distilbert(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng).last_hidden_state
        x = self.vocab_layer_norm(ACTIVATIONS[self.activation](self.vocab_transform(h)))
        logits = self.vocab_projector(x, self.distilbert.embeddings.word_embeddings)
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels), last_hidden_state=h)


register(DistilBertModel, model_types=("distilbert",), default=True)
for _cls in (DistilBertForSequenceClassification, DistilBertForTokenClassification, DistilBertForQuestionAnswering,
             DistilBertForMaskedLM, DistilBertForMultipleChoice):
    register(_cls)
