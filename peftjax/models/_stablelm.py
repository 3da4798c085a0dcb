"""Stability AI's StableLM (``model_type`` ``"stablelm"``: StableLM-3B-4E1T, StableLM 2 1.6B and
12B, StableLM Zephyr) in Flax NNX, with transformers' module names.

What differs from Llama:

- LayerNorms with biases (``input_layernorm``, ``post_attention_layernorm``, ``norm``;
  ``layer_norm_eps``); with ``use_parallel_residual`` (StableLM 2 12B) one norm per layer and
  attention and MLP side by side on its output (no ``post_attention_layernorm``);
- RoPE on the first ``partial_rotary_factor`` (0.25 by default) of each head; q/k/v biases by
  ``use_qkv_bias``, none on ``o_proj``; with ``qk_layernorm`` a LayerNorm of its own for each
  head's queries and keys (``q_layernorm.norms.{h}``, ``k_layernorm.norms.{h}``, no biases);
- ``hidden_dropout`` on the MLP's output (not the attention's), ``attention_dropout`` on the
  probabilities.
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
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaMLP,
    LlamaModel,
)
from peftjax.nn._dropout import split_keys


def _norm(config, **kw) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)


class LayerNormPerHead(nnx.Module):
    """``norms``: one bias-free LayerNorm per head, over that head's ``[..., heads, head_dim]`` slice
    (transformers' ``StableLmLayerNormPerHead``)."""

    def __init__(self, head_dim: int, heads: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.norms = nnx.List([nnx.LayerNorm(head_dim, epsilon=eps, use_bias=False, dtype=dtype,
                                             param_dtype=param_dtype, rngs=rngs) for _ in range(heads)])
        self.eps = eps

    def __call__(self, x):
        scales = jnp.stack([norm.scale.get_value() for norm in self.norms])  # [heads, head_dim]
        scales = scales.reshape((1,) * (x.ndim - 2) + scales.shape)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scales.astype(jnp.float32)).astype(x.dtype)


class StableLmAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # q/k/v biases by flag
        d, kw = self.head_dim, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_layernorm = self.k_layernorm = nnx.data(None)
        if getattr(config, "qk_layernorm", False):
            self.q_layernorm = LayerNormPerHead(d, self.num_heads, eps=config.layer_norm_eps, **kw)
            self.k_layernorm = LayerNormPerHead(d, self.num_kv_heads, eps=config.layer_norm_eps, **kw)

    def project(self, x):
        q, k, v = super().project(x)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v


class StableLmDecoderLayer(nnx.Module):
    """``input_layernorm``, attention, then the MLP after ``post_attention_layernorm``, or (with
    ``use_parallel_residual``) on the input norm's output beside the attention."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = StableLmAttention(config, layer_idx, **kw)
        self.mlp = LlamaMLP(config, **kw)
        self.input_layernorm = _norm(config, **kw)
        self.parallel = bool(getattr(config, "use_parallel_residual", False))
        self.post_attention_layernorm = nnx.data(None) if self.parallel else _norm(config, **kw)
        self.dropout_rate = float(getattr(config, "hidden_dropout", 0.0) or 0.0)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training): ``attention_dropout`` on the
        probabilities, ``hidden_dropout`` on the MLP's output; ``None``: none."""
        attn_key, mlp_out_key = split_keys(dropout_rng, 2)
        h = self.input_layernorm(x)
        a, cache = self.self_attn(h, cos, sin, masks, cache, cache_index, prefix, attn_key)
        if self.parallel:
            return x + a + dropout(self.mlp(h), self.dropout_rate, mlp_out_key), cache
        x = x + a
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout_rate, mlp_out_key), cache


class StableLmModel(LlamaModel):
    """StableLM's decoder: ``embed_tokens``, ``layers``, ``norm`` (a LayerNorm)."""

    layer_class: ClassVar[type[nnx.Module]] = StableLmDecoderLayer
    make_norm = staticmethod(_norm)


class StableLmForCausalLM(LlamaForCausalLM):
    model_class: ClassVar[type[nnx.Module]] = StableLmModel


class StableLmForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = StableLmModel


class StableLmForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = StableLmModel


register(StableLmForCausalLM, model_types=("stablelm",), default=True)
register(StableLmForSequenceClassification)
register(StableLmForTokenClassification)
