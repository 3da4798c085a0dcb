"""AI2's OLMoE (``model_type`` ``"olmoe"``: OLMoE-1B-7B) in Flax NNX, under transformers' names.

Mixtral's decoder (``_mixtral``: its experts, router, load-balancing loss and checkpoint handling)
with OLMo's attention: ``q_norm`` and ``k_norm`` RMSNorms over the whole query and key projections
(OLMo 2's, before the split into heads and RoPE), then ``clip_qkv``'s clamp of the projections
(OLMo's). A token's top-k routing weights are renormalised only with ``norm_topk_prob`` (off by
default: the softmax's values). The Hub's checkpoints keep one ``mlp.experts.{e}.gate_proj`` /
``up_proj`` / ``down_proj`` linear per expert (and the router at ``mlp.gate``): that layout and
transformers 5's fused one load, and ``save_pretrained`` writes the Hub's. transformers has only
the causal LM for it.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralSparseMoeBlock,
)
from peftjax.models._olmo import Olmo2Attention, OlmoAttention

OLMOE_EXPERTS = ExpertLayout("OLMoE", "mlp", gate="gate_proj", up="up_proj", down="down_proj")


class OlmoeAttention(OlmoAttention, Olmo2Attention):
    """OLMo 2's whole-projection q/k norms, then OLMo's clamp (``clip_qkv``)."""


class OlmoeSparseMoeBlock(MixtralSparseMoeBlock):
    @staticmethod
    def renormalises(config) -> bool:
        return bool(config.norm_topk_prob)


class OlmoeDecoderLayer(MixtralDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = OlmoeAttention
    moe_class: ClassVar[type[nnx.Module]] = OlmoeSparseMoeBlock


class OlmoeModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = OlmoeDecoderLayer


class OlmoeForCausalLM(MixtralForCausalLM):
    """OLMoE: OLMo's attention over Mixtral's experts."""

    model_class: ClassVar[type[nnx.Module]] = OlmoeModel
    expert_layout: ClassVar[ExpertLayout] = OLMOE_EXPERTS


register(OlmoeForCausalLM, model_types=("olmoe",), default=True)
