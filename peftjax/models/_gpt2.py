"""GPT-2 in Flax NNX, with transformers' module names.

Learned absolute positions, pre-LayerNorm blocks, fused ``c_attn`` projections stored the way
HF's ``Conv1D`` stores them, and an LM head tied to ``wte``. Dropout runs only when the call is
given a ``dropout_rng`` key, so the model's state is nothing but its parameters.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout, token_classifier_dropout
from peftjax.nn._dropout import layer_key, split_keys
from peftjax.models._generation import GenerationMixin
from peftjax.models._losses import (
    causal_lm_head_loss,
    pool_last_token,
    sequence_classification_loss,
    span_outputs,
    token_labels_loss,
)
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._outputs import ModelOutput, kept_positions
from peftjax.nn._scan import check_remat, make_layers, run_layers
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._functional import softmax

# buffers of old checkpoints (the causal mask and its fill value), never weights; ``attn.c_attn.bias``
# is a weight, so only the exact ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` names match
_BUFFERS = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)",)


def _check_supported(config) -> None:
    act = getattr(config, "activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"activation_function {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if getattr(config, "add_cross_attention", False):
        raise ValueError("add_cross_attention=True (GPT-2 as an encoder-decoder's decoder) is not supported")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"n_embd {config.hidden_size} is not a multiple of n_head {config.num_attention_heads}")


def _kv_layout(config) -> tuple[int, int]:
    """``(heads, head dim)`` of every block's attention (no grouped-query heads in GPT-2)."""
    return config.num_attention_heads, config.hidden_size // config.num_attention_heads


class Conv1D(nnx.Linear):
    """transformers' ``Conv1D``: a linear layer whose torch weight is stored ``(in, out)``.

    The flax kernel is ``(in, out)`` too, so the checkpoint weight is taken as is (no transpose).
    It is an ``nnx.Linear``, so LoRA treats it as one, with PEFT's ``fan_in_fan_out=True``.
    """

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"kernel": ("weight", False), "bias": ("bias", False)}


class GPT2Attention(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        e = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = e // self.num_heads
        scale = self.head_dim**-0.5 if getattr(config, "scale_attn_weights", True) else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.scale = scale
        # mixed precision: the scores in float32 (torch's baddbmm path); a no-op in float32
        self.upcast = bool(getattr(config, "reorder_and_upcast_attn", False))
        self.attn_pdrop = float(config.attn_pdrop)
        self.resid_pdrop = float(config.resid_pdrop)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_attn = Conv1D(e, 3 * e, **kw)
        self.c_proj = Conv1D(e, e, **kw)

    def __call__(self, x, mask, cache=None, cache_index=None, dropout_rng=None, prefix=None):
        b, s, e = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(b, s, self.num_heads, self.head_dim) for t in (q, k, v))
        if cache is not None:
            cache = attn.update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]
        if prefix is not None:
            k, v = attn.prepend_prefix(k, prefix[0]), attn.prepend_prefix(v, prefix[1])
        probs_key, resid_key = split_keys(dropout_rng, 2)
        if self.upcast:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.scale
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = softmax(scores, axis=-1).astype(v.dtype)
        probs = dropout(probs, self.attn_pdrop, probs_key)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, e)
        return dropout(self.c_proj(out), self.resid_pdrop, resid_key), cache


class GPT2MLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e = config.hidden_size
        inner = getattr(config, "n_inner", None) or 4 * e
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Conv1D(e, inner, **kw)
        self.c_proj = Conv1D(inner, e, **kw)
        self.activation_function = getattr(config, "activation_function", "gelu_new")
        self.resid_pdrop = float(config.resid_pdrop)

    def __call__(self, x, dropout_rng=None):
        h = ACTIVATIONS[self.activation_function](self.c_fc(x))
        return dropout(self.c_proj(h), self.resid_pdrop, dropout_rng)


class GPT2Block(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nnx.LayerNorm(e, epsilon=eps, **kw)
        self.attn = GPT2Attention(config, layer_idx, **kw)
        self.ln_2 = nnx.LayerNorm(e, epsilon=eps, **kw)
        self.mlp = GPT2MLP(config, **kw)

    def __call__(self, x, mask, cache=None, cache_index=None, dropout_rng=None, prefix=None):
        attn_key, mlp_key = split_keys(dropout_rng, 2)
        a, cache = self.attn(self.ln_1(x), mask, cache, cache_index, attn_key, prefix)
        x = a + x
        return x + self.mlp(self.ln_2(x), mlp_key), cache


class GPT2Model(PreTrainedModel):
    """The bare transformer: ``wte``, ``wpe``, the blocks ``h`` and ``ln_f``."""

    base_model_prefix: ClassVar[str] = "transformer"
    ignored_keys: ClassVar[tuple[str, ...]] = (*_BUFFERS, r"lm_head\.weight")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        _check_supported(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        e = config.hidden_size
        self.wte = nnx.Embed(config.vocab_size, e, **kw)
        self.wpe = nnx.Embed(config.max_position_embeddings, e, **kw)
        # peftjax options set on the config (see nn._scan): blocks stacked and scanned; remat policy
        self.remat = check_remat(getattr(config, "remat", "none"))
        if getattr(config, "scan_layers", False) and getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("scan_layers=True needs the same attention scale in every block; "
                             "scale_attn_by_inverse_layer_idx=True differs per block (use scan_layers=False)")
        self.h = make_layers(
            config, lambda i, r: GPT2Block(config, i, dtype=dtype, param_dtype=param_dtype, rngs=r), rngs=rngs
        )
        self.ln_f = nnx.LayerNorm(e, epsilon=config.layer_norm_epsilon, **kw)
        self.embd_pdrop = float(config.embd_pdrop)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        cache=None,
        cache_index=None,
        dropout_rng=None,
        prefix_kv=None,
    ) -> ModelOutput:
        """Runs the blocks; dropout is applied only when ``dropout_rng`` (a JAX key) is given.

        ``prefix_kv`` follows the prefix attention protocol (``peftjax.models._attention``).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(jnp.asarray(input_ids))
        x = jnp.asarray(inputs_embeds)
        b, s, _ = x.shape
        pos = attn.decoder_positions(
            b, s, attention_mask=attention_mask, position_ids=position_ids, cache=cache, cache_index=cache_index,
            prefix_kv=prefix_kv, num_layers=len(self.h), owner=type(self).__name__,
            prefix_layout=lambda: _kv_layout(self.config),
        )
        start = pos.start
        x = x + self.wpe(pos.position_ids)
        if token_type_ids is not None:
            x = x + self.wte(jnp.asarray(token_type_ids))
        mask = attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True)
        embd_key, layers_key = split_keys(dropout_rng, 2)
        x = dropout(x, self.embd_pdrop, embd_key)
        new_cache = [] if cache is not None else None
        loop = cache is not None or prefix_kv is not None
        if not loop:  # training and scoring: scanned and/or rematerialised, dropout or not
            x = run_layers(self.h, lambda block, h, k: block(h, mask, dropout_rng=k)[0], x, self.remat, layers_key)
        for i, block in enumerate(self.h if loop else ()):
            prefix = None if prefix_kv is None else prefix_kv[i]
            x, layer_cache = block(x, mask, None if cache is None else cache[i], start, layer_key(layers_key, i),
                                   prefix)
            if cache is not None:
                new_cache.append(layer_cache)
        return ModelOutput(last_hidden_state=self.ln_f(x), past_key_values=new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return attn.init_kv_cache(self.config.num_hidden_layers, batch, max_len, *_kv_layout(self.config),
                                  dtype or self.dtype)


class GPT2LMHeadModel(GenerationMixin, PreTrainedModel):
    """Causal LM: ``transformer`` and an ``lm_head`` that is always ``transformer.wte``.

    >>> from transformers import GPT2Config
    >>> model = GPT2LMHeadModel.from_config(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4))
    >>> model(input_ids=[[5, 6, 7]]).logits.shape
    (1, 3, 128)
    """

    base_model_prefix: ClassVar[str] = "transformer"
    ignored_keys: ClassVar[tuple[str, ...]] = _BUFFERS

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not getattr(self.config, "tie_word_embeddings", True):
            # an untied head would be a separate weight that this model silently drops
            raise ValueError("GPT2LMHeadModel ties lm_head to wte; tie_word_embeddings=False is not supported")
        self.transformer = GPT2Model(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _tied(self, key: str) -> bool:
        return key == "lm_head.weight"

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        inputs_embeds=None,
        cache=None,
        cache_index=None,
        dropout_rng=None,
        prefix_kv=None,
        logits_to_keep=0,
    ) -> ModelOutput:
        """``logits_to_keep``: the positions whose logits are computed, as transformers' (0: all;
        ``n``: the last ``n``; 1-D indices: those)."""
        out = self.transformer(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, cache, cache_index, dropout_rng,
            prefix_kv,
        )
        h = out.last_hidden_state
        logits = self.transformer.wte.attend(kept_positions(h, logits_to_keep, labels))
        loss = None
        if labels is not None:  # fused with the tied output projection when traced
            loss = causal_lm_head_loss(h, logits, jnp.asarray(labels), None, self.transformer.wte)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h, past_key_values=out.past_key_values)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return self.transformer.init_cache(batch, max_len, dtype)


class GPT2WithHead(PreTrainedModel):
    """``transformer`` (a :class:`GPT2Model`) and a task head: the base of GPT-2's sequence and token
    classifiers and question answering, whose checkpoints are the LM's without its tied ``lm_head``."""

    base_model_prefix: ClassVar[str] = "transformer"
    ignored_keys: ClassVar[tuple[str, ...]] = GPT2Model.ignored_keys

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.transformer = GPT2Model(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GPT2ForSequenceClassification(GPT2WithHead):
    """Sequence classification: the transformer plus a ``score`` head read at the last real token."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"score\.weight",)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.score = nnx.Linear(
            config.hidden_size, config.num_labels, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        inputs_embeds=None,
        dropout_rng=None,
        prefix_kv=None,
    ) -> ModelOutput:
        out = self.transformer(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, dropout_rng=dropout_rng,
            prefix_kv=prefix_kv,
        )
        logits = self.score(out.last_hidden_state)
        pooled = pool_last_token(logits, input_ids, self.config.pad_token_id)
        loss = None if labels is None else sequence_classification_loss(pooled, jnp.asarray(labels), self.config)
        return ModelOutput(logits=pooled, loss=loss, last_hidden_state=out.last_hidden_state)


class GPT2ForTokenClassification(GPT2WithHead):
    """Token classification (PEFT's ``TOKEN_CLS``): the transformer, dropout (``classifier_dropout``,
    else ``hidden_dropout``, else 0.1) and a biased ``classifier`` on every token, as transformers'.
    Each token sees only the tokens before it."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.dropout_rate = token_classifier_dropout(config)
        self.classifier = nnx.Linear(config.hidden_size, config.num_labels, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        inputs_embeds=None,
        dropout_rng=None,
        prefix_kv=None,
    ) -> ModelOutput:
        """Classifies every token, ``[batch, seq, num_labels]``; ``labels`` (``[batch, seq]`` ints,
        ``-100`` where no label counts) add the mean cross entropy over the labelled tokens."""
        base_rng, head_rng = split_keys(dropout_rng, 2)
        out = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               dropout_rng=base_rng, prefix_kv=prefix_kv)
        logits = self.classifier(dropout(out.last_hidden_state, self.dropout_rate, head_rng))
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels),
                           last_hidden_state=out.last_hidden_state)


class GPT2ForQuestionAnswering(GPT2WithHead):
    """Extractive question answering (PEFT's ``QUESTION_ANS``): the transformer and a biased
    ``qa_outputs`` giving every token a start and an end logit, as transformers'."""

    optional_keys: ClassVar[tuple[str, ...]] = (r"qa_outputs\.(weight|bias)",)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qa_outputs = nnx.Linear(self.config.hidden_size, 2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

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
        """``start_logits`` and ``end_logits``, ``[batch, seq]``; ``start_positions`` and
        ``end_positions`` (``[batch]`` token indices) add transformers' loss (:func:`span_loss`)."""
        out = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                               dropout_rng=dropout_rng, prefix_kv=prefix_kv)
        logits = self.qa_outputs(out.last_hidden_state)
        return ModelOutput(**span_outputs(logits, start_positions, end_positions),
                           last_hidden_state=out.last_hidden_state)


register(GPT2LMHeadModel, model_types=("gpt2",), default=True)
register(GPT2Model)
register(GPT2ForSequenceClassification)
register(GPT2ForTokenClassification)
register(GPT2ForQuestionAnswering)
