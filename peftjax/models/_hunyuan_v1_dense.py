"""Tencent Hunyuan dense (``model_type`` ``"hunyuan_v1_dense"``: Hunyuan-0.5B, 1.8B, 4B, 7B) in Flax
NNX, under transformers' names.

Against Llama: each head's queries and keys are RMS-normalised *after* RoPE (``query_layernorm``,
``key_layernorm``); the checkpoints' RoPE is ``"dynamic"`` with a fixed ``alpha``, which only
raises the base to ``rope_theta * alpha ** (head_dim / (head_dim - 2))`` (transformers' NTK alpha:
the frequencies never change with the sequence's length).
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)
from peftjax.nn._norm import RMSNorm


class HunYuanDenseV1Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_layernorm = RMSNorm(self.head_dim, **kw)
        self.key_layernorm = RMSNorm(self.head_dim, **kw)

    def encode_positions(self, q, k, cos, sin, masks):
        q, k = super().encode_positions(q, k, cos, sin, masks)
        return self.query_layernorm(q), self.key_layernorm(k)


class HunYuanDenseV1DecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = HunYuanDenseV1Attention


class HunYuanDenseV1Model(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = HunYuanDenseV1DecoderLayer


class HunYuanDenseV1ForCausalLM(LlamaForCausalLM):
    """Hunyuan dense: Llama with per-head q/k norms after RoPE."""

    model_class: ClassVar[type[nnx.Module]] = HunYuanDenseV1Model


class HunYuanDenseV1ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = HunYuanDenseV1Model


register(HunYuanDenseV1ForCausalLM, model_types=("hunyuan_v1_dense",), default=True)
register(HunYuanDenseV1ForSequenceClassification)
