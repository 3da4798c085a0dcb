"""Mistral 4 (Mistral Small 4) in Flax NNX: DeepSeek-V3's architecture with softmax routing and a
position-dependent query scale, under transformers' names (``Mistral4ForCausalLM`` of transformers 5).

Against DeepSeek-V3 (``_deepseek_v3``, whose latent attention, experts and decoder this reuses):

* the router (``mlp.gate``: ``weight [experts, hidden]`` in the model's dtype, no
  ``e_score_correction_bias``) scores experts by the softmax of its logits, and chooses them by
  those scores within the ``topk_group`` best of ``n_group`` groups (one group by default);
* every query is multiplied by Llama 4's scale ``1 + llama_4_scaling_beta * log(1 + floor(position
  / original_max_position_embeddings))`` (both read from ``rope_parameters``);
* ``head_dim`` is ``qk_nope_head_dim + qk_rope_head_dim`` and RoPE turns its last
  ``partial_rotary_factor`` (``qk_rope_head_dim / head_dim`` by default); the default RoPE is YaRN
  (factor 128 over 8192 positions, ``mscale_all_dim`` 1: the score scale grows by ``mscale ** 2``);
* by default every layer is sparse (``first_k_dense_replace`` 0);
* checkpoints keep the experts fused (transformers converts no per-expert layout for Mistral 4), and
  PEFT 0.22.0 converts no LoRA targets for it: module names and ``all-linear`` reach the attention,
  the dense and shared MLPs; the experts and the router take ``target_parameters``
  (``["gate_up_proj", "down_proj", "gate.weight"]``). PEFT has no default targets for it.

Refused by name, besides DeepSeek-V3's refusals: ``rope_parameters`` without
``llama_4_scaling_beta`` or ``original_max_position_embeddings`` (transformers fails without them).
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
    MlaForTokenClassification,
    group_limited_routing,
)
from peftjax.models._mixtral import expert_count
from peftjax.nn._param_reader import ParamReader


def llama4_query_scale(config) -> tuple[float, int]:
    """``(llama_4_scaling_beta, original_max_position_embeddings)`` of ``rope_parameters``.

    Raises:
      ValueError: one is missing (named).
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    missing = [k for k in ("llama_4_scaling_beta", "original_max_position_embeddings") if params.get(k) is None]
    if missing:
        raise ValueError(f"{config.model_type}: its queries are scaled by rope_parameters' llama_4_scaling_beta and "
                         f"original_max_position_embeddings; {missing} missing (found {sorted(params)})")
    return float(params["llama_4_scaling_beta"]), int(params["original_max_position_embeddings"])


def llama4_query_scale_at(positions, beta: float, scale_positions: float) -> jax.Array:
    """Llama 4's query scale at each position, float32: ``1 + beta * log(1 + floor(positions /
    scale_positions))`` (Mistral 4's at its positions; Llama 4's NoPE layers' at positions + 1, with
    ``attn_scale`` and ``floor_scale``)."""
    positions = jnp.asarray(positions).astype(jnp.float32)
    return 1 + beta * jnp.log1p(jnp.floor(positions / scale_positions))


class Mistral4TopkRouter(ParamReader, nnx.Module):
    """``mlp.gate``: ``weight [experts, hidden]`` (LoRA-adaptable through ``target_parameters``)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (expert_count(config), config.hidden_size), param_dtype))
        self.dtype = dtype
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.renormalise, self.scaling = bool(config.norm_topk_prob), float(config.routed_scaling_factor)

    def __call__(self, x):
        """``(router logits, weights [tokens, k], experts [tokens, k])``; the softmax in float32."""
        logits = x @ self.param_value("weight").astype(self.dtype).T
        scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights, index = group_limited_routing(scores, scores, top_k=self.top_k, n_group=self.n_group,
                                               topk_group=self.topk_group, renormalise=self.renormalise,
                                               scaling=self.scaling)
        return logits, weights, index


class Mistral4MoE(DeepseekV3MoE):
    router_class: ClassVar[type[nnx.Module]] = Mistral4TopkRouter


class Mistral4DecoderLayer(DeepseekV3DecoderLayer):
    moe_class: ClassVar[type[nnx.Module]] = Mistral4MoE


class Mistral4Model(DeepseekV3Model):
    layer_class: ClassVar[type[nnx.Module]] = Mistral4DecoderLayer

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.beta, self.original = llama4_query_scale(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def query_scale(self, position_ids, dtype):
        return llama4_query_scale_at(position_ids, self.beta, self.original).astype(dtype)


class Mistral4ForCausalLM(MlaForCausalLM):
    """Mistral 4: DeepSeek-V3's latent attention and experts, softmax routing, scaled queries."""

    model_class: ClassVar[type[nnx.Module]] = Mistral4Model


class Mistral4ForSequenceClassification(MlaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Mistral4Model


class Mistral4ForTokenClassification(MlaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Mistral4Model


register(Mistral4ForCausalLM, model_types=("mistral4",), default=True)
register(Mistral4ForSequenceClassification)
register(Mistral4ForTokenClassification)
