"""Qwen3-MoE in Flax NNX: Qwen3's attention with Mixtral's sparse mixture of experts, under transformers' names.

Against Mixtral (``_mixtral``, whose experts, router, load-balancing loss and checkpoint handling
this reuses):

* the attention is Qwen3's (``q_norm``/``k_norm`` per head, ``attention_bias`` on all four
  projections); with ``use_sliding_window`` every layer uses ``sliding_window``;
* an expert's size is ``moe_intermediate_size``; a token's top-k routing weights are renormalised
  to sum to one only with ``norm_topk_prob`` (the softmax's values otherwise);
* a layer is sparse unless it is in ``mlp_only_layers`` or ``(layer + 1) % decoder_sparse_step``
  is not 0; a dense layer has Qwen3's MLP (``gate_proj``/``up_proj``/``down_proj``,
  ``intermediate_size``) and no router, so the load-balancing loss and ``router_logits`` cover the
  sparse layers only, as transformers records them; ``scan_layers=True`` needs every layer alike;
* no router jitter;
* the Hub's checkpoints keep one ``mlp.experts.{e}.gate_proj``/``up_proj``/``down_proj`` linear
  per expert (and the router at ``mlp.gate``): both that layout and transformers 5's fused one
  load, and ``save_pretrained`` writes the Hub's, as transformers 5.24 does.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import LlamaForQuestionAnswering, LlamaForSequenceClassification, LlamaForTokenClassification
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralSparseMoeBlock,
    _MoeCheckpoints,
    expert_count,
)
from peftjax.models._qwen3 import Qwen3Attention

QWEN_MOE_EXPERTS = ExpertLayout("Qwen3-MoE", "mlp", gate="gate_proj", up="up_proj", down="down_proj")


class Qwen3MoeSparseMoeBlock(MixtralSparseMoeBlock):
    @staticmethod
    def expert_size(config) -> int:
        return config.moe_intermediate_size

    @staticmethod
    def renormalises(config) -> bool:
        return bool(config.norm_topk_prob)


class Qwen3MoeDecoderLayer(MixtralDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Qwen3Attention
    moe_class: ClassVar[type[nnx.Module]] = Qwen3MoeSparseMoeBlock

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        """transformers' rule: not in ``mlp_only_layers``, experts configured, and on the sparse step."""
        return (layer_idx not in (config.mlp_only_layers or ()) and expert_count(config) > 0
                and (layer_idx + 1) % config.decoder_sparse_step == 0)


class Qwen3MoeModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    """Qwen3-MoE: Qwen3's attention, sparse experts in all but the configured dense layers."""

    model_class: ClassVar[type[nnx.Module]] = Qwen3MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


class Qwen3MoeForSequenceClassification(_MoeCheckpoints, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen3MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


class Qwen3MoeForTokenClassification(_MoeCheckpoints, LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen3MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


class Qwen3MoeForQuestionAnswering(_MoeCheckpoints, LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = Qwen3MoeModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS


register(Qwen3MoeForCausalLM, model_types=("qwen3_moe",), default=True)
register(Qwen3MoeForSequenceClassification)
register(Qwen3MoeForTokenClassification)
register(Qwen3MoeForQuestionAnswering)
