"""DeepSeek-V2 (and V2-Lite, V2.5, DeepSeek-Coder-V2) in Flax NNX, under transformers' names
(``DeepseekV2ForCausalLM`` of transformers 5).

DeepSeek-V3's layers (``_deepseek_v3``: multi-head latent attention with its RoPE on adjacent
pairs, the first ``first_k_dense_replace`` layers dense and the others a mixture of routed and
shared experts) with V2's router:

* **Routing** (``mlp.gate``: ``weight [experts, hidden]``, float32 as transformers keeps it): a
  token's scores are the softmax of its router logits; ``topk_method="greedy"`` chooses the
  ``num_experts_per_tok`` best experts, ``"group_limited_greedy"`` (DeepSeek-V2's own) the best
  within the ``topk_group`` of ``n_group`` expert groups whose best score is highest. The chosen
  experts are weighted by their scores times ``routed_scaling_factor``, not renormalised:
  transformers' V2 router ignores ``norm_topk_prob`` (every DeepSeek-V2 checkpoint sets it false).
  No ``e_score_correction_bias``, no load-balancing loss (transformers computes none either).

Checkpoints: the Hub's per-expert layout (``mlp.experts.N.gate_proj/up_proj/down_proj``) and
transformers 5's fused one both load; ``save_pretrained`` writes the per-expert one. LoRA: PEFT
0.22.0 converts V2's MoE targets with its ``qwen2_moe`` pattern, as V3's (see ``_deepseek_v3``);
prefix tuning is refused (latent attention takes no prefix); transformers has no token classifier
for V2.

Refused by name: a ``topk_method`` other than the two, a ``scoring_func`` other than
``"softmax"``, a ``moe_layer_freq`` other than 1 (transformers puts the MoE in every layer from
``first_k_dense_replace`` on), no ``num_experts_per_tok``, expert groups that do not divide the
experts, and V3's refusals (activation, key/value heads, RoPE).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3Model,
    DeepseekV3MoE,
    MlaForCausalLM,
    MlaForSequenceClassification,
    check_latent_attention,
    sparse_layers,
)
from peftjax.models._mixtral import ExpertLayout, _MoeCheckpoints, expert_count
from peftjax.nn._param_reader import ParamReader

DEEPSEEK_V2_EXPERTS = ExpertLayout("DeepSeek-V2", "mlp", gate="gate_proj", up="up_proj", down="down_proj")
TOPK_METHODS = ("greedy", "group_limited_greedy")


def check_deepseek_v2_config(config) -> None:
    """Refuses by name what transformers' DeepSeek-V2 does not compute as the config says."""
    method = getattr(config, "topk_method", None) or "greedy"
    if method not in TOPK_METHODS:
        raise ValueError(f"topk_method {method!r} is not supported; DeepSeek-V2 routes with one of {TOPK_METHODS} "
                         "(transformers' DeepseekV2TopkRouter)")
    scoring = getattr(config, "scoring_func", None)
    if scoring not in (None, "softmax"):
        raise ValueError(f"scoring_func {scoring!r} is not supported; DeepSeek-V2 scores experts with 'softmax'")
    frequency = getattr(config, "moe_layer_freq", None)
    if frequency not in (None, 1):
        raise ValueError(f"moe_layer_freq={frequency} is not supported: transformers' DeepSeek-V2 puts the experts in "
                         f"every layer from first_k_dense_replace={config.first_k_dense_replace} on")
    check_latent_attention(config)
    if not any(sparse_layers(config)):
        return
    e, k = expert_count(config), config.num_experts_per_tok
    if method == "greedy":
        if not k or not 1 <= k <= e:
            raise ValueError(f"num_experts_per_tok={k} must be between 1 and n_routed_experts={e}")
        return
    groups, chosen = config.n_group, config.topk_group
    if not groups or e % groups:
        raise ValueError(f"topk_method 'group_limited_greedy': n_group={groups} must divide n_routed_experts={e}")
    if not chosen or not 1 <= chosen <= groups:
        raise ValueError(f"topk_group={chosen} must be between 1 and n_group={groups}")
    if not k or not 1 <= k <= chosen * (e // groups):
        raise ValueError(f"num_experts_per_tok={k} must be between 1 and the {chosen * (e // groups)} experts of "
                         f"topk_group={chosen} groups")


def greedy_routing(scores, *, top_k: int, n_group: int | None = None, topk_group: int | None = None,
                   scaling: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Each token's ``(weights, experts)`` (``[tokens, top_k]``) from its ``scores [tokens, experts]``,
    as transformers' DeepSeek-V2 router: the ``top_k`` best (within the ``topk_group`` of ``n_group``
    groups whose best score is highest, when both are given), weighted by their scores times
    ``scaling``."""
    if n_group is not None and topk_group is not None:
        t, e = scores.shape
        best = jnp.max(scores.reshape(t, n_group, e // n_group), axis=-1)
        _, groups = jax.lax.top_k(best, topk_group)
        kept = jnp.any(jax.nn.one_hot(groups, n_group, dtype=bool), axis=-2)  # [tokens, groups]
        scores = jnp.where(jnp.repeat(kept, e // n_group, axis=-1), scores, 0.0)  # transformers' masked_fill
    weights, index = jax.lax.top_k(scores, top_k)
    return weights * scaling, index


class DeepseekV2TopkRouter(ParamReader, nnx.Module):
    """``mlp.gate``: ``weight [experts, hidden]`` in float32 (LoRA-adaptable through
    ``target_parameters``, ``"gate.weight"``)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (expert_count(config), config.hidden_size), jnp.float32))
        grouped = (getattr(config, "topk_method", None) or "greedy") == "group_limited_greedy"
        self.groups = (config.n_group, config.topk_group) if grouped else (None, None)
        self.top_k, self.scaling = config.num_experts_per_tok, float(config.routed_scaling_factor)

    def __call__(self, x):
        """``(router logits [tokens, experts], weights [tokens, k], experts [tokens, k])`` of ``x [tokens,
        hidden]``, in float32."""
        logits = x.astype(jnp.float32) @ self.param_value("weight").astype(jnp.float32).T
        scores = jax.nn.softmax(logits, axis=-1)
        weights, index = greedy_routing(scores, top_k=self.top_k, n_group=self.groups[0], topk_group=self.groups[1],
                                        scaling=self.scaling)
        return logits, weights, index


class DeepseekV2MoE(DeepseekV3MoE):
    router_class: ClassVar[type[nnx.Module]] = DeepseekV2TopkRouter


class DeepseekV2DecoderLayer(DeepseekV3DecoderLayer):
    moe_class: ClassVar[type[nnx.Module]] = DeepseekV2MoE


class DeepseekV2Model(DeepseekV3Model):
    layer_class: ClassVar[type[nnx.Module]] = DeepseekV2DecoderLayer
    check_config = staticmethod(check_deepseek_v2_config)


class DeepseekV2ForCausalLM(_MoeCheckpoints, MlaForCausalLM):
    """DeepSeek-V2: V3's latent attention and experts, softmax routing (greedy or by groups)."""

    model_class: ClassVar[type[nnx.Module]] = DeepseekV2Model
    expert_layout: ClassVar[ExpertLayout] = DEEPSEEK_V2_EXPERTS


class DeepseekV2ForSequenceClassification(_MoeCheckpoints, MlaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = DeepseekV2Model
    expert_layout: ClassVar[ExpertLayout] = DEEPSEEK_V2_EXPERTS


register(DeepseekV2ForCausalLM, model_types=("deepseek_v2",), default=True)
register(DeepseekV2ForSequenceClassification)
