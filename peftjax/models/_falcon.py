"""TII's Falcon (``model_type`` ``"falcon"``: Falcon-7B, -40B, -180B, Falcon2-11B, falcon-rw) in Flax
NNX, with transformers' module names.

What differs from Llama:

- the decoder is ``transformer``: ``word_embeddings``, blocks ``h``, ``ln_f``; the LM head tied;
- each block's ``self_attention`` is one ``query_key_value`` and ``dense`` (biased by ``bias``),
  the fused output laid out by architecture: ``new_decoder_architecture`` (40B, 180B, Falcon2)
  groups each key/value head's queries, then its key and value (``num_kv_heads``);
  ``multi_query`` (7B) puts every head's query first, then one key and one value; otherwise each
  head's query, key and value in turn;
- LayerNorms; attention and MLP side by side (``parallel_attn``): on one norm's output
  (``input_layernorm``), or each on its own (``ln_attn``, ``ln_mlp``: the new architecture's
  ``num_ln_in_parallel_attn`` 2), the two branches' sum dropped at ``hidden_dropout``; or one after
  the other (``post_attention_layernorm``; the attention's output dropped at ``attention_dropout``,
  as transformers does);
- RoPE over whole heads, or with ``alibi`` (falcon-rw) ALiBi: BLOOM's slopes, taken to bfloat16 with
  the key positions as transformers computes them, over the square root of the head size;
- the MLP ``dense_4h_to_h(act(dense_h_to_4h(x)))``, ``ffn_hidden_size`` wide, exact GELU by default.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._bloom import ALIBI, alibi_slopes
from peftjax.models._dropout import dropout
from peftjax.models._llama import (
    DecoderUnderPrefix,
    DenseMLP,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    layer_norm,
)
from peftjax.nn._dropout import split_keys


class FalconAttention(LlamaAttention):
    out_name: ClassVar[str] = "dense"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, layer_idx)
        h, d = config.hidden_size, self.head_dim
        kw = dict(use_bias=bool(config.bias), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_key_value = nnx.Linear(h, (self.num_heads + 2 * self.num_kv_heads) * d, **kw)
        self.dense = nnx.Linear(h, h, **kw)
        self.layout = ("grouped" if config.new_decoder_architecture else "multi_query" if config.multi_query
                       else "per_head")
        self.alibi = bool(config.alibi)

    def project(self, x):
        b, s, _ = x.shape
        qkv = self.query_key_value(x)
        heads, kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.layout == "grouped":  # [kv heads, its queries + key + value, head_dim]
            grouped = qkv.reshape(b, s, kv, heads // kv + 2, d)
            return grouped[..., :-2, :].reshape(b, s, heads, d), grouped[..., -2:-1, :][..., 0, :], grouped[..., -1, :]
        if self.layout == "multi_query":  # every query, then one key and one value
            fused = qkv.reshape(b, s, heads + 2, d)
            return fused[:, :, :heads], fused[:, :, heads:heads + 1], fused[:, :, heads + 1:]
        fused = qkv.reshape(b, s, heads, 3, d)  # each head's query, key and value
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]

    def score_options(self, masks) -> dict:
        return {"bias": masks[ALIBI]} if self.alibi else {}


class FalconMLP(DenseMLP):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))``, ``ffn_hidden_size`` wide, biased by ``bias``."""

    names: ClassVar[tuple[str, str]] = ("dense_h_to_4h", "dense_4h_to_h")
    activation_field: ClassVar[str] = "activation"

    @staticmethod
    def width(config) -> int:
        return config.ffn_hidden_size

    @staticmethod
    def bias(config) -> bool:
        return bool(config.bias)


def norms_in_parallel(config) -> int | None:
    """How many norms a parallel block has (1: one for both branches, 2: ``ln_attn``, ``ln_mlp``);
    ``None`` for the sequential block."""
    if not config.parallel_attn and not config.new_decoder_architecture:
        return None
    return config.num_ln_in_parallel_attn or (2 if config.new_decoder_architecture else 1)


class FalconDecoderLayer(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attention = FalconAttention(config, layer_idx, **kw)
        self.mlp = FalconMLP(config, **kw)
        self.norms = norms_in_parallel(config)
        if self.norms == 2:
            self.ln_attn, self.ln_mlp = layer_norm(config, **kw), layer_norm(config, **kw)
        else:
            self.input_layernorm = layer_norm(config, **kw)
            if self.norms is None:
                self.post_attention_layernorm = layer_norm(config, **kw)
        self.hidden_rate = float(config.hidden_dropout or 0.0)
        self.attention_rate = float(config.attention_dropout or 0.0)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training); ``None``: no dropout."""
        attn_key, attn_out_key, out_key = split_keys(dropout_rng, 3)
        h = self.ln_attn(x) if self.norms == 2 else self.input_layernorm(x)
        a, cache = self.self_attention(h, cos, sin, masks, cache, cache_index, prefix, attn_key)
        if self.norms is None:  # one after the other
            x = x + dropout(a, self.attention_rate, attn_out_key)
            return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.hidden_rate, out_key), cache
        m = self.mlp(self.ln_mlp(x) if self.norms == 2 else h)
        return x + dropout(m + a, self.hidden_rate, out_key), cache


class FalconModel(LlamaModel):
    """Falcon's decoder: ``word_embeddings``, ``h``, ``ln_f``."""

    layer_class: ClassVar[type[nnx.Module]] = FalconDecoderLayer
    embed_name: ClassVar[str] = "word_embeddings"
    layers_name: ClassVar[str] = "h"
    norm_name: ClassVar[str] = "ln_f"
    make_norm = staticmethod(layer_norm)

    @staticmethod
    def make_rotary(config):
        return None if config.alibi else LlamaModel.make_rotary(config)

    def attention_masks(self, pos: attn.DecoderPositions, segment_ids=None) -> dict:
        masks = super().attention_masks(pos, segment_ids)
        if self.config.alibi:  # transformers' Falcon: the slopes and the product in bfloat16
            key_positions = attn.alibi_key_positions(pos.key_mask, jnp.bfloat16)
            slopes = jnp.asarray(alibi_slopes(self.config.num_attention_heads)).astype(jnp.bfloat16)
            bias = (slopes[None, :, None] * key_positions[:, None]).astype(jnp.float32)
            masks[ALIBI] = bias / math.sqrt(self.config.hidden_size // self.config.num_attention_heads)
        return masks


class _UnderTransformer(DecoderUnderPrefix):
    base_model_prefix: ClassVar[str] = "transformer"
    model_class: ClassVar[type[nnx.Module]] = FalconModel


class FalconForCausalLM(_UnderTransformer, LlamaForCausalLM):
    """Falcon: ``transformer`` and the LM head (tied to ``word_embeddings`` by default)."""


class FalconForSequenceClassification(_UnderTransformer, LlamaForSequenceClassification):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class FalconForTokenClassification(_UnderTransformer, LlamaForTokenClassification):
    """Token classification: the decoder, dropout (``classifier_dropout``, else ``hidden_dropout``)
    and a biased ``classifier`` on every token."""

    head_name: ClassVar[str] = "classifier"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class FalconForQuestionAnswering(_UnderTransformer, LlamaForQuestionAnswering):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


register(FalconForCausalLM, model_types=("falcon",), default=True)
register(FalconForSequenceClassification)
register(FalconForTokenClassification)
register(FalconForQuestionAnswering)
