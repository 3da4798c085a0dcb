"""Cohere's Command R (``model_type`` ``"cohere"``) and Command R7B / Command A (``"cohere2"``) in
Flax NNX: Llama's attention and MLP in one parallel block.

What differs from Llama:

- each layer normalises its input once (``input_layernorm``, a LayerNorm without bias, in float32)
  and adds attention and MLP, both of that input, to the residual: ``x + attn(n) + mlp(n)``;
- RoPE turns adjacent pairs of dimensions (``(2i, 2i + 1)`` by frequency ``i``, GLM's rotation);
- the logits are the tied embeddings' times ``logit_scale`` (here the hidden states the head
  reads are scaled, which keeps the fused loss);
- Command R's ``use_qk_norm`` normalises each head's queries and keys (a LayerNorm with a weight
  per head);
- Command R7B's sliding layers (``layer_types``) attend within ``sliding_window`` with RoPE, its
  full layers over everything without RoPE (NoPE), as SmolLM3's kinds (``_layer_kinds``).

transformers has only the causal LM for these families.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._glm4 import Glm4Attention
from peftjax.models._layer_kinds import LayerKindsModel, checked_layer_types
from peftjax.models._llama import LlamaForCausalLM, LlamaModel, ParallelDecoderLayer


def layer_norm(x, weight, epsilon: float):
    """transformers' ``CohereLayerNorm``: ``x`` centred and scaled to unit variance over its last
    axis, times ``weight`` (no bias), in float32, back in ``x``'s dtype."""
    h = x.astype(jnp.float32)
    mean = jnp.mean(h, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
    weight = weight.astype(jnp.float32).reshape((1,) * (h.ndim - weight.ndim) + weight.shape)
    return (weight * ((h - mean) * jax.lax.rsqrt(variance + epsilon))).astype(x.dtype)


class CohereLayerNorm(nnx.LayerNorm):
    """A LayerNorm without bias, computed in float32 (``weight`` in the checkpoint)."""

    def __init__(self, features: int, *, epsilon: float, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(features, epsilon=epsilon, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, mask=None):
        if mask is not None:
            raise NotImplementedError("CohereLayerNorm takes no mask")
        return layer_norm(x, self.scale[...], self.epsilon)


class CohereHeadNorm(nnx.Module):
    """Command R's query or key norm: each head's vector normalised, times its head's ``weight``
    row (``[heads, head_dim]``)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False)}

    def __init__(self, heads: int, head_dim: int, *, epsilon: float, param_dtype):
        self.weight = nnx.Param(jnp.ones((heads, head_dim), param_dtype))
        self.epsilon = epsilon

    def __call__(self, x):  # [b, s, heads, head_dim]
        return layer_norm(x, self.weight[...], self.epsilon)


class CohereAttention(Glm4Attention):
    """Llama's attention with pairwise RoPE; with ``use_qk_norm``, each head's queries and keys
    normalised before it."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = self.k_norm = nnx.data(None)
        if getattr(config, "use_qk_norm", False):
            eps = config.layer_norm_eps
            self.q_norm = CohereHeadNorm(self.num_heads, self.head_dim, epsilon=eps, param_dtype=param_dtype)
            self.k_norm = CohereHeadNorm(self.num_kv_heads, self.head_dim, epsilon=eps, param_dtype=param_dtype)

    def project(self, x):
        q, k, v = super().project(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


def _norm(config, **kw) -> nnx.Module:
    return CohereLayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)


class CohereDecoderLayer(ParallelDecoderLayer):
    """One norm, then attention and MLP side by side, both added to the residual."""

    attention_class: ClassVar[type[nnx.Module]] = CohereAttention
    make_norm = staticmethod(_norm)


class CohereModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = CohereDecoderLayer
    make_norm = staticmethod(_norm)


class CohereForCausalLM(LlamaForCausalLM):
    """Command R: parallel blocks, pairwise RoPE, logits times ``logit_scale``."""

    model_class: ClassVar[type[nnx.Module]] = CohereModel

    def head_input(self, h):
        return h * jnp.asarray(self.config.logit_scale, h.dtype)


class Cohere2DecoderLayer(CohereDecoderLayer):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn.window = None  # the decoder passes each layer its kind's mask (and RoPE, or none)


class Cohere2Model(LayerKindsModel):
    """Command R7B's decoder: sliding layers with RoPE, full layers without."""

    layer_class: ClassVar[type[nnx.Module]] = Cohere2DecoderLayer
    make_norm = staticmethod(_norm)

    def layer_kinds_of(self, config):
        kinds = checked_layer_types(config)
        if "sliding_attention" in kinds and config.sliding_window is None:
            raise ValueError("cohere2: layer_types has sliding_attention layers but sliding_window is None")
        rope = LlamaModel.make_rotary(config)
        return kinds, tuple((k, rope if k == "sliding_attention" else None,
                             config.sliding_window if k == "sliding_attention" else None) for k in sorted(set(kinds)))


class Cohere2ForCausalLM(CohereForCausalLM):
    """Command R7B / Command A: Command R's blocks, sliding RoPE layers and global NoPE ones."""

    model_class: ClassVar[type[nnx.Module]] = Cohere2Model


register(CohereForCausalLM, model_types=("cohere",), default=True)
register(Cohere2ForCausalLM, model_types=("cohere2",), default=True)
