"""Liquid AI's LFM2-MoE (``model_type`` ``"lfm2_moe"``: LFM2-8B-A1B) in Flax NNX, under
transformers' names.

LFM2's hybrid decoder (``_lfm2``: gated short convolutions and attention by ``layer_types``) whose
feed-forward, past the first ``num_dense_layers`` layers (SwiGLU ``w1``/``w3``/``w2`` of
``intermediate_size``), is a mixture of experts, ``feed_forward``:

- ``gate``: the router's ``weight [experts, hidden]``; a token's scores are the sigmoid of its
  logits, its ``num_experts_per_tok`` experts those of the highest score plus ``expert_bias`` (with
  ``use_expert_bias``; float32, a frozen base weight here), weighted by their scores, normalised to
  sum to one (plus 1e-6) with ``norm_topk_prob``, times ``routed_scaling_factor``;
- ``experts``: fused as transformers 5 holds them (``gate_up_proj [E, 2 I, hidden]``,
  ``down_proj [E, hidden, I]``, ``I = moe_intermediate_size``), run densely (or
  ``expert_dispatch="grouped"``), as Mixtral's.

The Hub's per-expert checkpoints (``feed_forward.experts.N.w1/w3/w2``) and the fused layout both
load; ``save_pretrained`` writes the per-expert one, as transformers does. transformers computes no
load-balancing loss for it, nor does this. PEFT 0.22.0 converts no LFM2-MoE targets: the experts
and the router take LoRA through ``target_parameters``.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._lfm2 import Lfm2DecoderLayer, Lfm2ForCausalLM, Lfm2Model
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralExperts,
    MixtralTopKRouter,
    _MoeCheckpoints,
    check_top_k,
    expert_count,
    expert_dispatch,
    top_k_by_choice,
)
from peftjax.nn._param_reader import ParamReader

LFM2_MOE_EXPERTS = ExpertLayout("LFM2-MoE", "feed_forward", gate="w1", up="w3", down="w2",
                                memory_block="feed_forward")


def sigmoid_routing(logits, bias, top_k: int, renormalise: bool, scaling: float) -> tuple[jax.Array, jax.Array]:
    """LFM2-MoE's ``(weights, experts)`` (``[tokens, top_k]`` each): experts chosen by
    ``sigmoid(logits) + bias`` (``bias`` ``None``: by the sigmoid alone), weighted by the sigmoid."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores if bias is None else scores + bias.astype(jnp.float32)[None, :]
    return top_k_by_choice(scores, choice, top_k, renormalise, scaling, epsilon=1e-6)


class Lfm2MoeSparseMoeBlock(ParamReader, nnx.Module):
    """``feed_forward`` of a sparse layer: ``gate``, ``experts`` and ``expert_bias``."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"expert_bias": ("expert_bias", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_top_k(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = MixtralTopKRouter(config, **kw)
        self.experts = MixtralExperts(config, config.moe_intermediate_size, **kw)
        self.expert_bias = (nnx.Param(jnp.zeros((expert_count(config),), jnp.float32))
                            if config.use_expert_bias else nnx.data(None))
        self.top_k, self.renormalise = config.num_experts_per_tok, bool(config.norm_topk_prob)
        self.scaling, self.dispatch = float(config.routed_scaling_factor), expert_dispatch(config)

    def __call__(self, x):
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        bias = None if self.expert_bias is None else jax.lax.stop_gradient(self.param_value("expert_bias"))
        weights, index = sigmoid_routing(self.gate(flat), bias, self.top_k, self.renormalise, self.scaling)
        return self.experts.routed(flat, weights, index, self.dispatch).reshape(b, s, h)


class Lfm2MoeDecoderLayer(Lfm2DecoderLayer):
    """LFM2's layer with the experts as ``feed_forward`` from layer ``num_dense_layers`` on."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if layer_idx >= config.num_dense_layers:
            self.feed_forward = Lfm2MoeSparseMoeBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Lfm2MoeModel(Lfm2Model):
    layer_class: ClassVar[type[nnx.Module]] = Lfm2MoeDecoderLayer

    @classmethod
    def check_scan(cls, config) -> None:
        super().check_scan(config)
        if 0 < config.num_dense_layers < config.num_hidden_layers:
            raise ValueError(f"scan_layers=True needs alike layers; lfm2_moe's first num_dense_layers="
                             f"{config.num_dense_layers} layers are dense and the rest sparse")


class Lfm2MoeForCausalLM(_MoeCheckpoints, Lfm2ForCausalLM):
    """LFM2-MoE's causal LM: ``model`` (LFM2's hybrid decoder with experts) and ``lm_head`` (tied by default)."""

    model_class: ClassVar[type[nnx.Module]] = Lfm2MoeModel
    expert_layout: ClassVar[ExpertLayout] = LFM2_MOE_EXPERTS


register(Lfm2MoeForCausalLM, model_types=("lfm2_moe",), default=True)
