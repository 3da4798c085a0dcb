"""Qwen3-Next (``qwen3_next``) in Flax NNX, with transformers' names: Qwen3.5-MoE's hybrid decoder
(``_qwen3_5``) as its forerunner, Qwen3-Next-80B-A3B, writes it.

Against Qwen3.5-MoE, whose attention, norms, delta rule, cache, MoE block and checkpoint layouts
this reuses:

* the linear attention's input projections are two fused linears, their outputs grouped by key
  head: ``in_proj_qkvz`` gives, for each of the ``linear_num_key_heads`` key heads, its query, its
  key, then the values and the gates ``z`` of the value heads it serves; ``in_proj_ba`` likewise
  each key head's value heads' ``b`` then ``a`` (transformers' ``fix_query_key_value_ordering``);
* a layer's MLP is the sparse block (routed experts, a shared expert weighted by
  ``sigmoid(shared_expert_gate(x))``) unless the layer is in ``mlp_only_layers`` or off
  ``decoder_sparse_step`` (Qwen3-MoE's rule), where it is a SwiGLU MLP of ``intermediate_size``;
  the top-k weights are renormalised only with ``norm_topk_prob``;
* question answering too; its decoder under ``transformer``, as transformers keeps it.

LoRA: transformers' conversion table sends ``qwen3_next`` to PEFT's ``qwen2_moe`` pattern, so PEFT
0.22 turns targets named ``gate``, ``gate_proj``, ``up_proj``, ``down_proj`` (and ``all-linear``'s)
into ``target_parameters`` on the router and experts and keeps them on the shared expert's and
dense MLPs' linears (0.21.2 moved them), as for Qwen3-MoE; peftjax does the same.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    DecoderWithHead,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaMLP,
)
from peftjax.models._mixtral import ExpertLayout, _MoeCheckpoints
from peftjax.models._qwen2_moe import Qwen2MoeSparseMoeBlock
from peftjax.models._qwen3_5 import (
    Qwen3_5DecoderLayer,
    Qwen3_5GatedDeltaNet,
    Qwen3_5MoeForCausalLM,
    Qwen3_5TextModel,
)
from peftjax.models._qwen3_moe import QWEN_MOE_EXPERTS, Qwen3MoeDecoderLayer


class Qwen3NextGatedDeltaNet(Qwen3_5GatedDeltaNet):
    """``linear_attn``: Qwen3.5's Gated DeltaNet with the fused ``in_proj_qkvz`` and ``in_proj_ba``."""

    def make_projections(self, hidden: int, **kw) -> None:
        self.in_proj_qkvz = nnx.Linear(hidden, 2 * self.key_dim + 2 * self.value_dim, **kw)
        self.in_proj_ba = nnx.Linear(hidden, 2 * self.num_v_heads, **kw)

    def project(self, x):
        b, s, _ = x.shape
        hk, dk, per_key = self.num_k_heads, self.head_k_dim, self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).reshape(b, s, hk, -1)  # per key head: q, k, its values, their gates
        q, k, v, z = jnp.split(qkvz, [dk, 2 * dk, 2 * dk + per_key * self.head_v_dim], axis=-1)
        ba = self.in_proj_ba(x).reshape(b, s, hk, 2 * per_key)
        flat = lambda t: t.reshape(b, s, -1)  # noqa: E731
        qkv = jnp.concatenate([flat(q), flat(k), flat(v)], axis=-1)
        z = z.reshape(b, s, self.num_v_heads, self.head_v_dim)
        return qkv, z, flat(ba[..., :per_key]), flat(ba[..., per_key:])


class Qwen3NextDecoderLayer(Qwen3_5DecoderLayer):
    linear_attention_class: ClassVar[type[nnx.Module]] = Qwen3NextGatedDeltaNet
    is_sparse = staticmethod(Qwen3MoeDecoderLayer.is_sparse)

    @classmethod
    def make_mlp(cls, config, layer_idx: int, **kw) -> nnx.Module:
        """The sparse block (Qwen2-MoE's) on a sparse layer, a SwiGLU MLP elsewhere."""
        if cls.is_sparse(config, layer_idx):
            return Qwen2MoeSparseMoeBlock(config, layer_idx, **kw)
        return LlamaMLP(config, **kw)


class Qwen3NextModel(Qwen3_5TextModel):
    """The decoder stack: ``embed_tokens``, ``layers``, ``norm``."""

    layer_class: ClassVar[type[nnx.Module]] = Qwen3NextDecoderLayer


class _Qwen3NextCheckpoints(_MoeCheckpoints):
    """Both expert layouts read, the Hub's written; the multi-token prediction weights skipped."""

    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS
    ignored_keys: ClassVar[tuple[str, ...]] = (*DecoderWithHead.ignored_keys, r"mtp\..*")


class Qwen3NextForCausalLM(Qwen3_5MoeForCausalLM):
    """Qwen3-Next's causal LM: ``model`` (the hybrid decoder with experts) and ``lm_head``; ``aux_loss``
    and ``router_logits`` over the sparse layers as :class:`~peftjax.models.Qwen3_5MoeForCausalLM`'s."""

    model_class: ClassVar[type[nnx.Module]] = Qwen3NextModel


class Qwen3NextForSequenceClassification(_Qwen3NextCheckpoints, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen3NextModel


class Qwen3NextForTokenClassification(_Qwen3NextCheckpoints, LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Qwen3NextModel


class Qwen3NextForQuestionAnswering(_Qwen3NextCheckpoints, LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = Qwen3NextModel


register(Qwen3NextForCausalLM, model_types=("qwen3_next",), default=True)
register(Qwen3NextForSequenceClassification)
register(Qwen3NextForTokenClassification)
register(Qwen3NextForQuestionAnswering)
