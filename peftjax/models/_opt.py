"""Meta's OPT (``model_type`` ``"opt"``: opt-125m to opt-66b, the model of PEFT's int8 notebook and
TRL's examples) in Flax NNX, with transformers' module names.

What differs from Llama:

- the decoder is ``model.decoder``: ``embed_tokens`` (``word_embed_proj_dim`` wide, projected to
  the hidden size by ``project_in`` and back by ``project_out`` where the two differ, as in
  opt-350m), learned ``embed_positions`` (two rows more than ``max_position_embeddings``: row
  ``position + 2``), ``layers``, ``final_layer_norm`` (absent without ``do_layer_norm_before``);
- positions count each row's real tokens (``cumsum(mask) * mask - 1``: a left-padded row starts at
  0 at its first token, padding at -1), in every forward, as transformers' OPT counts them;
- no RoPE; ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` with biases (``enable_bias``); the MLP
  ``fc2(relu(fc1(x)))``; LayerNorms (``self_attn_layer_norm``, ``final_layer_norm``) before each
  branch, or after each residual add without ``do_layer_norm_before`` (opt-350m);
- ``dropout`` on each branch's output, ``attention_dropout`` on the attention probabilities;
- the LM head is tied to ``embed_tokens`` by default; the task heads read ``word_embed_proj_dim``.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaModel,
)
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import split_keys

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding's: position p reads row p + 2


def _check(config) -> None:
    if float(getattr(config, "layerdrop", 0.0) or 0.0) > 0:
        raise ValueError(f"opt: layerdrop {config.layerdrop} (skipping whole layers at random while training) is not "
                         "implemented; set layerdrop=0")
    if config.activation_function not in ACTIVATIONS:
        raise ValueError(f"opt: activation_function {config.activation_function!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}")


def _norm(config, **kw) -> nnx.LayerNorm:
    affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
    return nnx.LayerNorm(config.hidden_size, epsilon=1e-5, use_scale=affine, use_bias=affine, **kw)


class OPTAttention(LlamaAttention):
    """Llama's attention with ``out_proj``, biases by ``enable_bias``, and no RoPE."""

    out_name: ClassVar[str] = "out_proj"


class OPTDecoderLayer(nnx.Module):
    """Attention and MLP one after the other, each with its LayerNorm before it (or after its
    residual add, without ``do_layer_norm_before``) and ``dropout`` on its output."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = OPTAttention(config, layer_idx, **kw)
        self.self_attn_layer_norm = _norm(config, **kw)
        bias = bool(getattr(config, "enable_bias", True))
        self.fc1 = nnx.Linear(config.hidden_size, config.ffn_dim, use_bias=bias, **kw)
        self.fc2 = nnx.Linear(config.ffn_dim, config.hidden_size, use_bias=bias, **kw)
        self.final_layer_norm = _norm(config, **kw)
        self.norm_before = bool(getattr(config, "do_layer_norm_before", True))
        self.activation = config.activation_function
        self.dropout_rate = float(getattr(config, "dropout", 0.0) or 0.0)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training); ``None``: no dropout."""
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        h = self.self_attn_layer_norm(x) if self.norm_before else x
        a, cache = self.self_attn(h, cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = x + dropout(a, self.dropout_rate, attn_out_key)
        if not self.norm_before:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.norm_before else x
        x = x + dropout(self.fc2(ACTIVATIONS[self.activation](self.fc1(h))), self.dropout_rate, mlp_out_key)
        return (x if self.norm_before else self.final_layer_norm(x)), cache


class OPTDecoder(LlamaModel):
    """``embed_tokens``, ``embed_positions``, ``project_in``/``project_out`` (where
    ``word_embed_proj_dim`` differs from the hidden size), ``layers``, ``final_layer_norm``."""

    layer_class: ClassVar[type[nnx.Module]] = OPTDecoderLayer
    norm_name: ClassVar[str] = "final_layer_norm"
    make_norm = staticmethod(_norm)

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        _check(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, w = config.hidden_size, config.word_embed_proj_dim
        self.embed_positions = nnx.Embed(config.max_position_embeddings + POSITION_OFFSET, h, **kw)
        self.project_in = nnx.Linear(w, h, use_bias=False, **kw) if w != h else nnx.data(None)
        self.project_out = nnx.Linear(h, w, use_bias=False, **kw) if w != h else nnx.data(None)
        removed = getattr(config, "_remove_final_layer_norm", False)
        if not getattr(config, "do_layer_norm_before", True) or removed:
            self.final_layer_norm = nnx.data(None)

    @staticmethod
    def make_embedding(config, **kw) -> nnx.Embed:
        return nnx.Embed(config.vocab_size, config.word_embed_proj_dim, **kw)

    @staticmethod
    def make_rotary(config):
        return None

    def add_positions(self, x, position_ids):
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(jnp.asarray(position_ids) + POSITION_OFFSET).astype(x.dtype)

    def final_norm(self, x):
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaModel`; positions default to OPT's count of each row's real
        tokens (after a prefix of V entries, from V), where Llama's count slots (packed rows: from 0
        in each sequence)."""
        if position_ids is None and attention_mask is not None and segment_ids is None:
            seq = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
            position_ids = opt_positions(attention_mask, seq, cache_index,
                                         0 if prefix_kv is None else jnp.shape(prefix_kv[0][0])[1])
        return super().__call__(input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                                dropout_rng, segment_ids=segment_ids)


def opt_positions(attention_mask, seq: int, cache_index, num_prefix: int) -> jax.Array:
    """transformers' OPT positions: each real token's count among the row's real tokens (a
    prefix's V entries counting first), padding -1, for the ``seq`` tokens from ``cache_index``
    of the key mask (all of it without a cache)."""
    mask = jnp.asarray(attention_mask, jnp.int32)
    positions = (jnp.cumsum(mask, axis=1) + num_prefix) * mask - 1
    if cache_index is None:
        return positions[:, :seq]
    return jax.lax.dynamic_slice_in_dim(positions, jnp.asarray(cache_index, jnp.int32), seq, axis=1)


class OPTModel(nnx.Module):
    """``decoder``: what transformers' ``OPTModel`` holds."""

    packs_sequences: ClassVar[bool] = True

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.decoder = OPTDecoder(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @property
    def embed_tokens(self) -> nnx.Embed:
        return self.decoder.embed_tokens

    @property
    def config(self):
        return self.decoder.config

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        return self.decoder(input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                            dropout_rng, segment_ids=segment_ids)


class _OPTHeads:
    """OPT's heads read ``word_embed_proj_dim`` (the decoder's output after ``project_out``)."""

    model_class: ClassVar[type[nnx.Module]] = OPTModel

    @staticmethod
    def head_width(config) -> int:
        return config.word_embed_proj_dim


class OPTForCausalLM(_OPTHeads, LlamaForCausalLM):
    """OPT: ``model.decoder`` and the LM head (tied to ``embed_tokens`` by default)."""


class OPTForSequenceClassification(_OPTHeads, LlamaForSequenceClassification):
    pass


class OPTForQuestionAnswering(_OPTHeads, LlamaForQuestionAnswering):
    base_model_prefix: ClassVar[str] = "model"


register(OPTForCausalLM, model_types=("opt",), default=True)
register(OPTForSequenceClassification)
register(OPTForQuestionAnswering)
