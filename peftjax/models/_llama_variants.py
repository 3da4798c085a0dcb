"""Decoders that are Llama but for one part, in Flax NNX, with transformers' module names:

- Arcee (``arcee``: AFM-4.5B): the MLP has no gate, ``down_proj(relu2(up_proj(x)))`` (Nemotron's;
  ``hidden_act``, ``relu2`` by default);
- Helium (``helium``: Kyutai's Helium-1): RoPE turns adjacent pairs of each head (GLM's), the norms'
  epsilon is 1e-8 by default;
- Nemotron (``nemotron``: Minitron, Nemotron-Mini, Nemotron-4): Arcee's ReLU² MLP, RoPE on the
  first ``partial_rotary_factor`` (0.5 by default) of each head, and LayerNorms with biases whose
  weight is stored less one (``NemotronLayerNorm1P``: ``(1 + weight)``, epsilon ``norm_eps``);
  biases on every attention projection by ``attention_bias``;
- InternLM3 (``internlm3``): Llama itself (transformers builds ``LlamaForCausalLM`` for it); its
  ``qkv_bias`` and ``bias`` are ``attention_bias`` and ``mlp_bias``.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
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


class NemotronLayerNorm1P(nnx.LayerNorm):
    """LayerNorm (with bias) scaling by ``1 + weight``: the checkpoint's weight is the scale less one."""

    def __init__(self, num_features: int, *, epsilon: float, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                         scale_init=nnx.initializers.ones, rngs=rngs)  # transformers starts it at 1 (a scale of 2)

    def __call__(self, x, *args, **kwargs):
        del args, kwargs
        mean = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.epsilon)
        scale, bias = self.scale.get_value().astype(x.dtype), self.bias.get_value().astype(x.dtype)
        return normed * (1 + scale)[(None,) * (x.ndim - 1)] + bias[(None,) * (x.ndim - 1)]


def _nemotron_norm(config, **kw) -> nnx.Module:
    return NemotronLayerNorm1P(config.hidden_size, epsilon=config.norm_eps, **kw)


class NemotronDecoderLayer(ArceeDecoderLayer):
    make_norm = staticmethod(_nemotron_norm)


class NemotronModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = NemotronDecoderLayer
    make_norm = staticmethod(_nemotron_norm)


class NemotronForCausalLM(LlamaForCausalLM):
    """Nemotron: Arcee's ReLU² MLP with partial RoPE and (1 + weight) LayerNorms."""

    model_class: ClassVar[type[nnx.Module]] = NemotronModel


class NemotronForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = NemotronModel


class NemotronForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = NemotronModel


class NemotronForQuestionAnswering(LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = NemotronModel


register(ArceeForCausalLM, model_types=("arcee",), default=True)
register(NemotronForCausalLM, model_types=("nemotron",), default=True)
register(HeliumForCausalLM, model_types=("helium",), default=True)
register(LlamaForCausalLM, model_types=("internlm3",), default=True)
for _cls in (ArceeForSequenceClassification, ArceeForTokenClassification, ArceeForQuestionAnswering,
             HeliumForSequenceClassification, HeliumForTokenClassification, NemotronForSequenceClassification,
             NemotronForTokenClassification, NemotronForQuestionAnswering):
    register(_cls)
