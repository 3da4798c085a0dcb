"""BigCode's GPTBigCode (``model_type`` ``"gpt_bigcode"``: StarCoder, StarCoderBase, SantaCoder,
WizardCoder, Octocoder) in Flax NNX, with transformers' module names.

What differs from Llama:

- the decoder is ``transformer``: ``wte`` plus learned positions ``wpe`` (then ``embd_pdrop``),
  blocks ``h``, ``ln_f``; the LM head is tied to ``wte`` by default; no RoPE;
- each block is GPT-2's: ``ln_1``, attention, ``ln_2``, MLP (LayerNorms), each branch's output
  dropped at ``resid_pdrop`` before its residual add;
- the attention is one biased ``c_attn`` and ``c_proj``; with ``multi_query`` (StarCoder) the
  fused output is every head's query, then one key and one value (multi-query attention);
  otherwise each head's query, key and value in turn; scores scaled by the head size's root only
  with ``scale_attn_weights``;
- the MLP is ``c_proj(act(c_fc(x)))``, ``n_inner`` wide (4x the hidden size by default).
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._gptj import GPTJMLP
from peftjax.models._llama import (
    DecoderUnderPrefix,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    layer_norm,
)
from peftjax.nn._dropout import split_keys


class GPTBigCodeAttention(LlamaAttention):
    out_name: ClassVar[str] = "c_proj"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, layer_idx)
        self.num_kv_heads = 1 if config.multi_query else self.num_heads
        h, d = config.hidden_size, self.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_attn = nnx.Linear(h, h + 2 * self.num_kv_heads * d, **kw)
        self.c_proj = nnx.Linear(h, h, **kw)
        self.multi_query = bool(config.multi_query)
        self.dropout_rate = float(getattr(config, "attn_pdrop", 0.0) or 0.0)
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0

    def project(self, x):
        b, s, _ = x.shape
        qkv, heads, d = self.c_attn(x), self.num_heads, self.head_dim
        if self.multi_query:  # every query, then one key and one value
            fused = qkv.reshape(b, s, heads + 2, d)
            return fused[:, :, :heads], fused[:, :, heads:heads + 1], fused[:, :, heads + 1:]
        fused = qkv.reshape(b, s, heads, 3, d)  # each head's query, key and value
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]


class GPTBigCodeMLP(GPTJMLP):
    """GPT-J's MLP (``n_inner`` wide) under GPT-2's names: ``c_proj(act(c_fc(x)))``."""

    names: ClassVar[tuple[str, str]] = ("c_fc", "c_proj")


class GPTBigCodeBlock(nnx.Module):
    """GPT-2's block: ``ln_1``, ``attn``, ``ln_2``, ``mlp``, each branch dropped before its add (at
    the config's ``residual_dropout`` field; GPT-Neo's block is this one with its own parts)."""

    attention_class: ClassVar[type[nnx.Module]] = GPTBigCodeAttention
    mlp_class: ClassVar[type[nnx.Module]] = GPTBigCodeMLP
    residual_dropout: ClassVar[str] = "resid_pdrop"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = layer_norm(config, **kw)
        self.attn = self.attention_class(config, layer_idx, **kw)
        self.ln_2 = layer_norm(config, **kw)
        self.mlp = self.mlp_class(config, **kw)
        self.dropout_rate = float(getattr(config, self.residual_dropout, 0.0) or 0.0)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training): the attention's dropout on the
        probabilities, the residual one on each branch's output; ``None``: none."""
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        a, cache = self.attn(self.ln_1(x), cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = x + dropout(a, self.dropout_rate, attn_out_key)
        return x + dropout(self.mlp(self.ln_2(x)), self.dropout_rate, mlp_out_key), cache


class GPTBigCodeModel(LlamaModel):
    """GPTBigCode's decoder: ``wte`` and ``wpe`` (then ``embd_pdrop``), ``h``, ``ln_f``."""

    layer_class: ClassVar[type[nnx.Module]] = GPTBigCodeBlock
    embed_name: ClassVar[str] = "wte"
    layers_name: ClassVar[str] = "h"
    norm_name: ClassVar[str] = "ln_f"
    embedding_dropout: ClassVar[str] = "embd_pdrop"
    make_norm = staticmethod(layer_norm)

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        if getattr(config, "add_cross_attention", False):
            raise ValueError("gpt_bigcode: add_cross_attention=True (the decoder of an encoder-decoder) is "
                                      "not implemented; the causal LM and its task heads are")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wpe = nnx.Embed(config.max_position_embeddings, config.hidden_size, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def make_rotary(config):
        return None

    def add_positions(self, x, position_ids):
        return x + self.wpe(jnp.asarray(position_ids)).astype(x.dtype)


class _UnderTransformer(DecoderUnderPrefix):
    base_model_prefix: ClassVar[str] = "transformer"
    model_class: ClassVar[type[nnx.Module]] = GPTBigCodeModel


class GPTBigCodeForCausalLM(_UnderTransformer, LlamaForCausalLM):
    """GPTBigCode: ``transformer`` and the LM head (tied to ``wte`` by default)."""


class GPTBigCodeForSequenceClassification(_UnderTransformer, LlamaForSequenceClassification):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class GPTBigCodeForTokenClassification(_UnderTransformer, LlamaForTokenClassification):
    """Token classification: the decoder, dropout (``classifier_dropout``, else ``hidden_dropout``,
    else 0.1) and a biased ``classifier`` on every token."""

    head_name: ClassVar[str] = "classifier"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


register(GPTBigCodeForCausalLM, model_types=("gpt_bigcode",), default=True)
register(GPTBigCodeForSequenceClassification)
register(GPTBigCodeForTokenClassification)
