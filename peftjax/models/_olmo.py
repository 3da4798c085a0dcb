"""OLMo, OLMo 2 and OLMo 3 (AI2's open models) in Flax NNX, with transformers' module names.

OLMo (``olmo``: OLMo-1B, 7B, 7B-0424) is Llama with LayerNorms that have no weight nor bias
(epsilon 1e-5, in float32), no biases by default, and ``clip_qkv``: the query, key and value
projections clamped to ``[-clip_qkv, clip_qkv]`` before RoPE.

What OLMo 2 changes from Llama:

- ``q_norm`` and ``k_norm`` are RMSNorms over the whole query and key projections
  (``heads · head_dim`` wide, before the split into heads and RoPE), not per head as in Qwen3;
- norms come *after* each branch, not before: ``x + post_attention_layernorm(attn(x))``, then
  ``x + post_feedforward_layernorm(mlp(x))``; a layer has no ``input_layernorm``;
- ``attention_bias`` on all four projections, no MLP bias.

OLMo 3 adds ``layer_types`` (three sliding-window layers then a global one by default) and a RoPE
per layer type (``rope_parameters["sliding_attention"]`` / ``["full_attention"]``; a transformers 4
``rope_theta`` and ``rope_scaling`` set the global layers' only, as ``Olmo3Config`` reads them,
500 000 being the default base of both). Its layers differ only in their mask and RoPE, which the
decoder hands them (``_layer_kinds``), so ``scan_layers=True`` stacks them all.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._layer_kinds import (
    LAYER_TYPES,
    LayerKindsModel,
    checked_layer_types,
    kinds_by_type,
    rope_parameters_by_type,
    rotary_of,
)
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaMLP,
    LlamaModel,
    head_dim_of,
)
from peftjax.nn._dropout import split_keys
from peftjax.nn._norm import RMSNorm

OLMO3_DEFAULT_THETA = 500000.0


def _olmo_norm(config, **kw) -> nnx.LayerNorm:
    """OLMo's LayerNorm: no weight, no bias, epsilon 1e-5 whatever the config says, in float32."""
    kw = {**kw, "dtype": jnp.float32}
    return nnx.LayerNorm(config.hidden_size, epsilon=1e-5, use_bias=False, use_scale=False, **kw)


class OlmoAttention(LlamaAttention):
    """Llama's attention with the projections clamped to ``clip_qkv`` (where set) before RoPE."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.clip = None if config.clip_qkv is None else float(config.clip_qkv)

    def project(self, x):
        q, k, v = super().project(x)
        if self.clip is None:
            return q, k, v
        return tuple(jnp.clip(t, -self.clip, self.clip) for t in (q, k, v))


class OlmoDecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = OlmoAttention
    make_norm = staticmethod(_olmo_norm)


class OlmoModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = OlmoDecoderLayer
    make_norm = staticmethod(_olmo_norm)


class OlmoForCausalLM(LlamaForCausalLM):
    """OLMo: Llama with parameter-free LayerNorms and clamped projections."""

    model_class: ClassVar[type[nnx.Module]] = OlmoModel


class OlmoForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = OlmoModel


class Olmo2Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(self.num_heads * self.head_dim, **kw)
        self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, **kw)

    def project(self, x):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x)).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_norm(self.k_proj(x)).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        return q, k, v


class Olmo2DecoderLayer(nnx.Module):
    """Attention and MLP, each normalised after it and added to the residual."""

    attention_class: ClassVar[type[nnx.Module]] = Olmo2Attention

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.mlp = LlamaMLP(config, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's key for ``attention_dropout`` (training); ``None``: none."""
        (attn_key,) = split_keys(dropout_rng, 1)
        a, cache = self.self_attn(x, cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(x)), cache


class Olmo2Model(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = Olmo2DecoderLayer


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2: Llama with whole-projection q/k norms and norms after each branch."""

    model_class: ClassVar[type[nnx.Module]] = Olmo2Model


class Olmo2ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Olmo2Model


# ------------------------------------------------------------------------------------------ OLMo 3


def olmo3_layer_types(config) -> tuple[str, ...]:
    """Each layer's type, checked.

    Raises:
      ValueError: an unknown type, a list whose length is not ``num_hidden_layers``, or sliding
        layers without a ``sliding_window``.
    """
    found = checked_layer_types(config)
    if "sliding_attention" in found and config.sliding_window is None:
        raise ValueError(f"{config.model_type}: layer_types has sliding_attention layers but sliding_window is None")
    return found


def olmo3_rope_parameters(config) -> dict[str, dict]:
    """``{layer type: RoPE parameters}`` as ``Olmo3Config`` settles them: a top-level ``rope_theta``
    and ``rope_scaling`` (transformers 4's spellings) go to the global layers only.

    Raises:
      ValueError: ``rope_parameters`` not keyed by layer type.
    """
    return rope_parameters_by_type(config, dict.fromkeys(LAYER_TYPES, OLMO3_DEFAULT_THETA),
                                   {"full_attention": "rope_theta"})


class Olmo3Attention(Olmo2Attention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window = None  # the decoder passes each layer its own mask


class Olmo3DecoderLayer(Olmo2DecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Olmo3Attention


class Olmo3Model(LayerKindsModel):
    """OLMo 2's decoder whose layers each take their type's window and RoPE."""

    layer_class: ClassVar[type[nnx.Module]] = Olmo3DecoderLayer

    def layer_kinds_of(self, config):
        types, ropes = olmo3_layer_types(config), olmo3_rope_parameters(config)
        return types, kinds_by_type(types, lambda t: rotary_of(config, ropes[t], head_dim_of(config)),
                                    config.sliding_window)


class Olmo3ForCausalLM(LlamaForCausalLM):
    """OLMo 3: OLMo 2 with sliding-window layers and a RoPE per layer type."""

    model_class: ClassVar[type[nnx.Module]] = Olmo3Model


class Olmo3ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Olmo3Model


register(OlmoForCausalLM, model_types=("olmo",), default=True)
register(OlmoForSequenceClassification)
register(Olmo2ForCausalLM, model_types=("olmo2",), default=True)
register(Olmo2ForSequenceClassification)
register(Olmo3ForCausalLM, model_types=("olmo3",), default=True)
register(Olmo3ForSequenceClassification)
