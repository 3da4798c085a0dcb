"""Qwen2-MoE in Flax NNX (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen3-MoE's experts plus a gated shared expert.

Against Qwen3-MoE (``_qwen3_moe``, whose sparse-layer rule, routing and checkpoint layout this
reuses):

* the attention is Qwen2's: biases on q/k/v (``qkv_bias``), none on ``o_proj``, no q/k norms;
  with ``use_sliding_window``, layer ``i`` slides when ``i`` is even and below
  ``max_window_layers`` (transformers' ``layer_types`` rule), unless ``layer_types`` says otherwise;
* each sparse layer adds a shared expert every token goes through, ``mlp.shared_expert`` (a
  SwiGLU MLP of ``shared_expert_intermediate_size``), weighted by
  ``sigmoid(mlp.shared_expert_gate(x))`` (a ``[1, hidden]`` linear);
* the config counts its experts in ``num_experts`` (transformers keeps no ``num_local_experts``
  alias here).

LoRA: PEFT 0.22 converts this family's targets with its ``qwen2_moe`` pattern (0.21.2 converted
none): module names and ``all-linear`` keep the attention, the shared expert, its gate and the dense
layers' MLPs, and add ``target_parameters`` on the router (``gate.weight``) and the experts
(``gate_up_proj`` at doubled rank and alpha, ``down_proj``), as in PEFT.
"""

from __future__ import annotations

from typing import ClassVar

import jax
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaMLP,
)
from peftjax.models._mixtral import ExpertLayout, MixtralForCausalLM, MixtralModel, _MoeCheckpoints
from peftjax.models._qwen3_moe import QWEN_MOE_EXPERTS, Qwen3MoeDecoderLayer, Qwen3MoeSparseMoeBlock


class Qwen2MoeSparseMoeBlock(Qwen3MoeSparseMoeBlock):
    def __init__(self, config, layer_idx: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared_expert = LlamaMLP(config, intermediate_size=config.shared_expert_intermediate_size, **kw)
        self.shared_expert_gate = nnx.Linear(config.hidden_size, 1, use_bias=False, **kw)

    def __call__(self, x):
        out, logits = super().__call__(x)
        return out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x), logits


class Qwen2MoeDecoderLayer(Qwen3MoeDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = LlamaAttention
    moe_class: ClassVar[type[nnx.Module]] = Qwen2MoeSparseMoeBlock


class Qwen2MoeModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(MixtralForCausalLM):
    """Qwen2-MoE: Qwen2's attention, routed experts and a gated shared expert in each sparse layer."""

    model_class: ClassVar[type[nnx.Module]] = Qwen2MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


class Qwen2MoeForSequenceClassification(_MoeCheckpoints, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen2MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


class Qwen2MoeForTokenClassification(_MoeCheckpoints, LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen2MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


class Qwen2MoeForQuestionAnswering(_MoeCheckpoints, LlamaForQuestionAnswering):
    base_model_prefix: ClassVar[str] = "model"  # transformers' (not ``transformer``, as Llama's)
    model_class: ClassVar[type[nnx.Module]] = Qwen2MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


register(Qwen2MoeForCausalLM, model_types=("qwen2_moe",), default=True)
register(Qwen2MoeForSequenceClassification)
register(Qwen2MoeForTokenClassification)
register(Qwen2MoeForQuestionAnswering)
