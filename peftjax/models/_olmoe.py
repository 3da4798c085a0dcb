"""AI2's OLMoE (``model_type`` ``"olmoe"``: OLMoE-1B-7B) in Flax NNX, under transformers' names.

Mixtral's decoder (``_mixtral``: its experts, router, load-balancing loss and checkpoint handling)
with OLMo's attention: ``q_norm`` and ``k_norm`` RMSNorms over the whole query and key projections
(OLMo 2's, before the split into heads and RoPE), then ``clip_qkv``'s clamp of the projections
(OLMo's). A token's top-k routing weights are renormalised only with ``norm_topk_prob`` (off by
default: the softmax's values). The Hub's checkpoints keep one ``mlp.experts.{e}.gate_proj`` /
``up_proj`` / ``down_proj`` linear per expert (and the router at ``mlp.gate``): that layout and
transformers 5's fused one load, and ``save_pretrained`` writes the Hub's. transformers has only
the causal LM for it.

FlexOlmo (``model_type`` ``"flex_olmo"``: FlexOlmo-7x7B) is OLMoE's experts and router under OLMo 2's
layer: OLMo 2's attention (no clamp) and the norms after attention and the experts
(``post_attention_layernorm``, ``post_feedforward_layernorm``), none before.
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
from peftjax.nn._norm import RMSNorm

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


class FlexOlmoDecoderLayer(MixtralDecoderLayer):
    """OLMo 2's layer (each branch normalised after it) over OLMoE's experts."""

    moe_class: ClassVar[type[nnx.Module]] = OlmoeSparseMoeBlock

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Olmo2Attention(config, layer_idx, **kw)
        self.mlp = OlmoeSparseMoeBlock(config, layer_idx, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        a, cache = self.self_attn(x, cos, sin, masks, cache, cache_index, prefix, dropout_rng)
        x = x + self.post_attention_layernorm(a)
        out, logits = self.mlp(x)
        return x + self.post_feedforward_layernorm(out), cache, logits


class FlexOlmoModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = FlexOlmoDecoderLayer


class FlexOlmoForCausalLM(OlmoeForCausalLM):
    """FlexOlmo: OLMo 2's layers over OLMoE's experts."""

    model_class: ClassVar[type[nnx.Module]] = FlexOlmoModel


register(FlexOlmoForCausalLM, model_types=("flex_olmo",), default=True)
