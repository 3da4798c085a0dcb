"""Zhipu GLM-4 (``model_type`` ``"glm4"``, the 0414 releases; and ``"glm"``, the first GLM-4-9B
releases as transformers converts them) in Flax NNX, under transformers' names.

Against Llama (``glm``: the first three; ``glm4`` all four):

- the query, key and value projections carry biases (``attention_bias``), the output projection none;
- RoPE on the first ``partial_rotary_factor`` (0.5 by default) of each head, rotating *adjacent*
  pairs of dimensions ``(2i, 2i + 1)`` by frequency ``i`` (transformers' GLM ``rotate_half``), not
  the two halves;
- Phi-3's fused MLP (``gate_up_proj``, gate then up);
- four norms a layer: the attention's and the MLP's outputs are normalised again
  (``post_self_attn_layernorm``, ``post_mlp_layernorm``) before their residual adds.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from peftjax.nn._dropout import split_keys
from peftjax.models._phi3 import Phi3MLP
from peftjax.nn._norm import RMSNorm


def rotate_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """GLM's RoPE on ``x [batch, seq, heads, head_dim]``: the first ``cos.shape[-1]`` dims, as pairs
    ``(2i, 2i + 1)`` turned by the angle of frequency ``i`` (``cos``/``sin``: ``[b, s, rot]``, their
    first half the frequencies)."""
    rot = cos.shape[-1]
    c = jnp.repeat(cos[..., : rot // 2], 2, axis=-1)[:, :, None, :]
    s = jnp.repeat(sin[..., : rot // 2], 2, axis=-1)[:, :, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rot // 2, 2)
    turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x_rot.shape)
    out = x_rot * c + turned * s
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


class Glm4Attention(LlamaAttention):
    def rotate(self, x, cos, sin):
        return rotate_pairs(x, cos, sin)


class GlmDecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Glm4Attention
    mlp_class: ClassVar[type[nnx.Module]] = Phi3MLP


class GlmModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = GlmDecoderLayer


class GlmForCausalLM(LlamaForCausalLM):
    """GLM-4-9B (``glm``): biased q/k/v, pairwise partial RoPE, the fused MLP; Llama's two norms a layer."""

    model_class: ClassVar[type[nnx.Module]] = GlmModel


class GlmForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = GlmModel


class GlmForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = GlmModel


class Glm4DecoderLayer(GlmDecoderLayer):
    """GLM-4's layer (``glm``'s) with the attention's and the MLP's outputs normalised again."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_self_attn_layernorm = RMSNorm(config.hidden_size, **kw)
        self.post_mlp_layernorm = RMSNorm(config.hidden_size, **kw)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        attn_key, _, _ = split_keys(dropout_rng, 3)
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = x + self.post_self_attn_layernorm(a)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x))), cache


class Glm4Model(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = Glm4DecoderLayer


class Glm4ForCausalLM(LlamaForCausalLM):
    """GLM-4: biased q/k/v, pairwise partial RoPE, the fused MLP, norms after each branch."""

    model_class: ClassVar[type[nnx.Module]] = Glm4Model


class Glm4ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Glm4Model


class Glm4ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Glm4Model


register(GlmForCausalLM, model_types=("glm",), default=True)
register(GlmForSequenceClassification)
register(GlmForTokenClassification)
register(Glm4ForCausalLM, model_types=("glm4",), default=True)
register(Glm4ForSequenceClassification)
register(Glm4ForTokenClassification)
