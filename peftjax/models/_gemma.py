"""Gemma (the first generation, ``model_type`` ``"gemma"``; CodeGemma's too) in Flax NNX.

The Llama decoder with Gemma's pieces (shared with Gemma 2, ``_gemma2``): embeddings scaled by
``sqrt(hidden_size)`` (rounded to the table's dtype), RMSNorm times ``1 + weight`` in float32, a
GeGLU MLP (``hidden_act``; transformers reads a legacy ``"gelu"`` as the tanh approximation), an
explicit ``head_dim`` (256 by default) and tied embeddings. Unlike Gemma 2: one norm before each
branch, no soft-capping, every layer global, scores scaled by ``head_dim ** -0.5``.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._gemma2 import GemmaEmbeddingAndNorm, GemmaMLP, GemmaRMSNorm, check_gemma_config
from peftjax.models._llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)


class GemmaDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with Gemma's norms and MLP."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.mlp = GemmaMLP(config, **kw)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.resid_dropout_rate = 0.0


class GemmaModel(GemmaEmbeddingAndNorm, LlamaModel):
    """The decoder stack: ``embed_tokens`` (scaled), ``layers``, ``norm`` (Gemma's)."""

    layer_class: ClassVar[type[nnx.Module]] = GemmaDecoderLayer

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_gemma_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma: Llama with Gemma's embeddings, norms and GeGLU MLP; tied head by default."""

    model_class: ClassVar[type[nnx.Module]] = GemmaModel


class GemmaForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = GemmaModel


class GemmaForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = GemmaModel


register(GemmaForCausalLM, model_types=("gemma",), default=True)
register(GemmaForSequenceClassification)
register(GemmaForTokenClassification)
