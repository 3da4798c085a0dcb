"""Mistral AI's Ministral decoders in Flax NNX, with transformers' module names: ``ministral``
(Ministral 8B, 2024) and ``ministral3`` (Ministral 3: 3B, 8B, 14B).

- ``ministral``: Mistral's decoder with a window per layer (``layer_types``: every layer
  ``sliding_attention`` when ``sliding_window`` is set, by default); ``head_dim`` left out is
  the hidden size over the heads (transformers 5.25 fails there);
- ``ministral3``: Mistral's decoder (one ``sliding_window`` for every layer, none by default) with
  YaRN RoPE by default (factor 16 over 16384 positions) and every query multiplied, after RoPE, by
  Llama 4's scale at its position: ``1 + llama_4_scaling_beta * log(1 + floor(position /
  original_max_position_embeddings))`` (both from ``rope_parameters``, Mistral 4's rule).
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models import _attention as attn
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
from peftjax.models._mistral4 import llama4_query_scale, llama4_query_scale_at

QUERY_SCALE = "query_scale"  # [1 or b, q]: each query's scale, beside the masks the layers read


class MinistralForCausalLM(LlamaForCausalLM):
    """Ministral 8B: Mistral with a window per layer."""


class MinistralForSequenceClassification(LlamaForSequenceClassification):
    pass


class MinistralForTokenClassification(LlamaForTokenClassification):
    pass


class MinistralForQuestionAnswering(LlamaForQuestionAnswering):
    """transformers' decoder under ``transformer`` (Qwen2's question answering)."""


class Ministral3Attention(LlamaAttention):
    def encode_positions(self, q, k, cos, sin, masks):
        q, k = super().encode_positions(q, k, cos, sin, masks)
        return (q * masks[QUERY_SCALE][:, :, None, None]).astype(q.dtype), k


class Ministral3DecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Ministral3Attention


class Ministral3Model(LlamaModel):
    """Mistral's decoder whose queries are scaled by their positions (Llama 4's rule)."""

    layer_class: ClassVar[type[nnx.Module]] = Ministral3DecoderLayer

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.beta, self.original = llama4_query_scale(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def attention_masks(self, pos: attn.DecoderPositions, segment_ids=None) -> dict:
        masks = super().attention_masks(pos, segment_ids)
        masks[QUERY_SCALE] = llama4_query_scale_at(pos.position_ids, self.beta, self.original)
        return masks


class Ministral3ForCausalLM(LlamaForCausalLM):
    """Ministral 3: Mistral with YaRN and position-scaled queries."""

    model_class: ClassVar[type[nnx.Module]] = Ministral3Model


class Ministral3ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Ministral3Model


class Ministral3ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Ministral3Model


class Ministral3ForQuestionAnswering(LlamaForQuestionAnswering):
    """transformers' decoder under ``model`` (its generic question answering)."""

    base_model_prefix: ClassVar[str] = "model"
    model_class: ClassVar[type[nnx.Module]] = Ministral3Model


register(MinistralForCausalLM, model_types=("ministral",), default=True)
register(Ministral3ForCausalLM, model_types=("ministral3",), default=True)
for _cls in (MinistralForSequenceClassification, MinistralForTokenClassification, MinistralForQuestionAnswering,
             Ministral3ForSequenceClassification, Ministral3ForTokenClassification, Ministral3ForQuestionAnswering):
    register(_cls)
