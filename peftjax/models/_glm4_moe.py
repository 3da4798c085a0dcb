"""GLM-4.5's mixture of experts (``model_type`` ``"glm4_moe"``: GLM-4.5, GLM-4.5-Air, GLM-4.6) in
Flax NNX, under transformers' names (``Glm4MoeForCausalLM`` of transformers 5).

Grouped-query attention as Llama's (``_llama``), with:

* biases on ``q_proj``, ``k_proj`` and ``v_proj`` with ``attention_bias`` (``o_proj`` has none);
* with ``use_qk_norm``, Qwen3's per-head RMSNorm on queries and keys before RoPE (``q_norm``,
  ``k_norm``; ``_qwen3``);
* RoPE on the first ``partial_rotary_factor`` (0.5 by default) of each head, turning its two
  *halves* as Llama's does (GLM-4's ``_glm4`` turns adjacent pairs; GLM-4.5 does not).

The MLPs are DeepSeek-V3's (``_deepseek_v3``): the first ``first_k_dense_replace`` layers dense,
then ``n_routed_experts`` fused experts plus ``mlp.shared_experts``, routed by ``mlp.gate`` with
sigmoid scores, experts chosen by score + ``e_score_correction_bias`` among the ``topk_group`` best
of ``n_group`` groups, weighted by their scores (renormalised with ``norm_topk_prob``) times
``routed_scaling_factor``; no load-balancing loss (transformers computes none).

Checkpoints: the Hub's per-expert layout (``mlp.experts.N.gate_proj/up_proj/down_proj``) and
transformers 5's fused one both load; ``save_pretrained`` writes the per-expert one. The Hub's
multi-token-prediction layer (``model.layers.{num_hidden_layers}``) is not part of the model: its
keys are ignored with a warning. LoRA: PEFT 0.22.0 converts GLM-4.5's targets with its
``qwen2_moe`` pattern, as for DeepSeek-V3, and so does peftjax; PEFT has no default targets for it.

GLM-4.5 Lite (``"glm4_moe_lite"``, ``Glm4MoeLiteForCausalLM``) is DeepSeek-V3
(``DeepseekV3ForCausalLM`` here: multi-head latent attention, the same MoE) whose layers are dense
or sparse as ``mlp_layer_types`` says (by default the first dense, the others sparse), with
``head_dim`` an alias of ``qk_rope_head_dim``; its refusals are DeepSeek-V3's.

Refused by name: ``hidden_act`` other than ``silu``, expert groups that do not split the experts
in twos or more, a top k larger than the chosen groups hold, RoPE types peftjax does not compute,
and ``scan_layers=True`` over dense and sparse layers mixed.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3ForCausalLM,
    check_group_routing,
    check_same_mlp,
)
from peftjax.models._llama import LlamaForCausalLM, LlamaModel
from peftjax.models._mixtral import ExpertLayout, _MoeCheckpoints
from peftjax.models._qwen3 import Qwen3Attention

GLM4_MOE_EXPERTS = ExpertLayout("GLM-4.5", "mlp", gate="gate_proj", up="up_proj", down="down_proj")


class Glm4MoeAttention(Qwen3Attention):
    """Llama's attention with q/k/v biases and, with ``use_qk_norm``, Qwen3's q/k norms."""

    @staticmethod
    def uses_qk_norm(config) -> bool:
        return bool(getattr(config, "use_qk_norm", False))


class Glm4MoeDecoderLayer(DeepseekV3DecoderLayer):
    """Pre-norm attention, then a dense MLP (the first ``first_k_dense_replace`` layers) or DeepSeek-V3's MoE."""

    attention_class: ClassVar[type[nnx.Module]] = Glm4MoeAttention


class Glm4MoeModel(LlamaModel):
    """The decoder stack (``embed_tokens``, ``layers``, ``norm``)."""

    layer_class: ClassVar[type[nnx.Module]] = Glm4MoeDecoderLayer

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_group_routing(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def check_scan(config) -> None:
        check_same_mlp(config)


class Glm4MoeForCausalLM(_MoeCheckpoints, LlamaForCausalLM):
    """GLM-4.5: partial RoPE, optional q/k norms, dense then sparse layers with shared experts."""

    model_class: ClassVar[type[nnx.Module]] = Glm4MoeModel
    expert_layout: ClassVar[ExpertLayout] = GLM4_MOE_EXPERTS


class Glm4MoeLiteForCausalLM(DeepseekV3ForCausalLM):
    """GLM-4.5 Lite: DeepSeek-V3's latent attention and MoE, dense and sparse layers as ``mlp_layer_types`` says."""

    expert_layout: ClassVar[ExpertLayout] = GLM4_MOE_EXPERTS


register(Glm4MoeForCausalLM, model_types=("glm4_moe",), default=True)
register(Glm4MoeLiteForCausalLM, model_types=("glm4_moe_lite",), default=True)
