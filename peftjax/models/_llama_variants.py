"""Decoders that are Llama but for one part, in Flax NNX, with transformers' module names:

- Arcee (``arcee``: AFM-4.5B): the MLP has no gate, ``down_proj(relu2(up_proj(x)))`` (Nemotron's;
  ``hidden_act``, ``relu2`` by default);
- Helium (``helium``: Kyutai's Helium-1): RoPE turns adjacent pairs of each head (GLM's), the norms'
  epsilon is 1e-8 by default;
- InternLM3 (``internlm3``): Llama itself (transformers builds ``LlamaForCausalLM`` for it); its
  ``qkv_bias`` and ``bias`` are ``attention_bias`` and ``mlp_bias``.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._glm4 import rotate_pairs
from peftjax.models._llama import (
    DenseMLP,
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)


class ArceeMLP(DenseMLP):
    """``down_proj(act(up_proj(x)))``, no gate; biased by ``mlp_bias``."""

    names: ClassVar[tuple[str, str]] = ("up_proj", "down_proj")

    @staticmethod
    def bias(config) -> bool:
        return bool(getattr(config, "mlp_bias", False))


class ArceeDecoderLayer(LlamaDecoderLayer):
    mlp_class: ClassVar[type[nnx.Module]] = ArceeMLP


class ArceeModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = ArceeDecoderLayer


class ArceeForCausalLM(LlamaForCausalLM):
    """Arcee: Llama with a gate-less ReLU² MLP."""

    model_class: ClassVar[type[nnx.Module]] = ArceeModel


class ArceeForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = ArceeModel


class ArceeForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = ArceeModel


class ArceeForQuestionAnswering(LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = ArceeModel


class HeliumAttention(LlamaAttention):
    def rotate(self, x, cos, sin):
        return rotate_pairs(x, cos, sin)


class HeliumDecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = HeliumAttention


class HeliumModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = HeliumDecoderLayer


class HeliumForCausalLM(LlamaForCausalLM):
    """Helium: Llama with RoPE on adjacent pairs."""

    model_class: ClassVar[type[nnx.Module]] = HeliumModel


class HeliumForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = HeliumModel


class HeliumForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = HeliumModel


register(ArceeForCausalLM, model_types=("arcee",), default=True)
register(HeliumForCausalLM, model_types=("helium",), default=True)
register(LlamaForCausalLM, model_types=("internlm3",), default=True)
for _cls in (ArceeForSequenceClassification, ArceeForTokenClassification, ArceeForQuestionAnswering,
             HeliumForSequenceClassification, HeliumForTokenClassification):
    register(_cls)
