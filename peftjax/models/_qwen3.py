"""Qwen3 in Flax NNX: the Llama decoder with a per-head RMSNorm on queries and keys before RoPE.

What differs from Llama is only the attention's projections: ``q_norm`` and ``k_norm`` (RMSNorm
over ``head_dim``, shared by all heads), an explicit ``head_dim`` and ``attention_bias`` on all
four projections; sliding windows follow ``layer_types`` as Qwen2's do.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from peftjax.nn._norm import RMSNorm


class Qwen3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self.uses_qk_norm(config):
            self.q_norm = RMSNorm(self.head_dim, **kw)
            self.k_norm = RMSNorm(self.head_dim, **kw)
        else:
            self.q_norm = self.k_norm = nnx.data(None)

    @staticmethod
    def uses_qk_norm(config) -> bool:
        """Whether queries and keys are normalised (always in Qwen3; GLM-4.5's ``use_qk_norm`` says)."""
        return True

    def project(self, x):
        q, k, v = super().project(x)
        if self.q_norm is None:
            return q, k, v
        return self.q_norm(q), self.k_norm(k), v


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama with q/k RMSNorm per head."""

    model_class: ClassVar[type[nnx.Module]] = Qwen3Model


class Qwen3ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen3Model


class Qwen3ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen3Model


class Qwen3ForQuestionAnswering(LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = Qwen3Model


register(Qwen3ForCausalLM, model_types=("qwen3",), default=True)
register(Qwen3ForSequenceClassification)
register(Qwen3ForTokenClassification)
register(Qwen3ForQuestionAnswering)
