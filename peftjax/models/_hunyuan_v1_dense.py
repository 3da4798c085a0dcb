"""Tencent Hunyuan dense (``model_type`` ``"hunyuan_v1_dense"``: Hunyuan-0.5B, 1.8B, 4B, 7B) and MoE
(``"hunyuan_v1_moe"``: Hunyuan-A13B) in Flax NNX, under transformers' names.

Against Llama: each head's queries and keys are RMS-normalised *after* RoPE (``query_layernorm``,
``key_layernorm``); the checkpoints' RoPE is ``"dynamic"`` with a fixed ``alpha``, which only
raises the base to ``rope_theta * alpha ** (head_dim / (head_dim - 2))`` (transformers' NTK alpha:
the frequencies never change with the sequence's length). The MoE model's every MLP routes through
experts (see :class:`HunYuanMoEV1Moe`).
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaMLP,
    LlamaModel,
)
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralDecoderLayer,
    MixtralModel,
    MixtralSparseMoeBlock,
    _MoeCheckpoints,
    expert_count,
)
from peftjax.models._qwen3_moe import QWEN_MOE_EXPERTS
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


# ------------------------------------------------------------------------------------------ MoE


class HunYuanMoEV1Gate(nnx.Module):
    """``gate``: ``wg``, a float32 linear layer of the router's logits (in float32 too)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.wg = nnx.Linear(config.hidden_size, expert_count(config), use_bias=False, dtype=jnp.float32,
                             param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        return self.wg(x.astype(jnp.float32))


class HunYuanMoEV1Moe(MixtralSparseMoeBlock):
    """The router (``gate.wg``: softmax, top ``moe_topk``, renormalised), Mixtral's fused experts
    (``intermediate_size`` each) and ``shared_mlp`` (a SwiGLU as wide) on every token."""

    def __init__(self, config, layer_idx: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        for name in ("num_experts", "moe_topk"):
            if not isinstance(getattr(config, name), int):
                raise ValueError(f"hunyuan_v1_moe: {name} per layer ({getattr(config, name)}) is not supported "
                                 f"(nor by transformers' experts); expected one integer")
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = HunYuanMoEV1Gate(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared_mlp = LlamaMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        out, logits = super().__call__(x)
        return out.astype(x.dtype) + self.shared_mlp(x), logits


class HunYuanMoEV1DecoderLayer(MixtralDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = HunYuanDenseV1Attention
    moe_class: ClassVar[type[nnx.Module]] = HunYuanMoEV1Moe


class HunYuanMoEV1Model(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = HunYuanMoEV1DecoderLayer


class HunYuanMoEV1ForCausalLM(_MoeCheckpoints, LlamaForCausalLM):
    """Hunyuan MoE (Hunyuan-A13B): Hunyuan dense's attention over routed experts and a shared
    SwiGLU in every layer. transformers adds no router loss for it, nor does this. The Hub's
    per-expert layout (``mlp.experts.N.gate_proj``, ...) and transformers 5's fused one load;
    ``save_pretrained`` writes the per-expert one."""

    model_class: ClassVar[type[nnx.Module]] = HunYuanMoEV1Model
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


class HunYuanMoEV1ForSequenceClassification(_MoeCheckpoints, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = HunYuanMoEV1Model
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


register(HunYuanDenseV1ForCausalLM, model_types=("hunyuan_v1_dense",), default=True)
register(HunYuanDenseV1ForSequenceClassification)
register(HunYuanMoEV1ForCausalLM, model_types=("hunyuan_v1_moe",), default=True)
register(HunYuanMoEV1ForSequenceClassification)
