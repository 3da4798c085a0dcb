"""Baidu ERNIE 4.5 MoE (``model_type`` ``"ernie4_5_moe"``: ERNIE-4.5-21B-A3B, 300B-A47B) in Flax NNX,
under transformers' names.

ERNIE 4.5's dense layers (``_ernie4_5``: RoPE on adjacent pairs, ``use_bias`` on every projection)
with a mixture of experts in the layers ``moe_layer_start_index`` to ``moe_layer_end_index`` (-1:
the last) on every ``moe_layer_interval``-th layer (``mlp``), and a bias on the LM head with
``use_bias`` (transformers' ERNIE 4.5 MoE head has one):

* **Routing** (``mlp.gate``: ``weight [experts, hidden]`` and ``moe_statics.e_score_correction_bias
  [1, experts]``, float32 as transformers keeps them): a token's scores are the softmax of its router
  logits; the ``moe_k`` experts are *chosen* by score + bias and *weighted* by their scores,
  renormalised to sum to one (the sum clamped at ``moe_norm_min``). The bias is a base weight here
  (frozen under an adapter), a parameter transformers never trains.
* **Experts**: Mixtral's fused ``mlp.experts.gate_up_proj``/``down_proj`` of ``moe_intermediate_size``
  (no biases), plus ``mlp.shared_experts``, one SwiGLU of ``moe_num_shared_experts *
  moe_intermediate_size`` (biased with ``use_bias``) every token goes through, unweighted.
* The load-balancing loss with ``output_router_logits`` (``router_aux_loss_coef``), Mixtral's over the
  router's logits, as transformers computes it.

Checkpoints: the Hub's layout (``mlp.experts.N.gate_proj/up_proj/down_proj``, the bias at
``mlp.moe_statics.e_score_correction_bias``) and transformers 5's in-memory one both load;
``save_pretrained`` writes the Hub's, as transformers does; the multi-token-prediction block
(``mtp_*``) is skipped, as transformers skips it. LoRA: PEFT 0.22 converts the MoE targets with its
``qwen2_moe`` pattern (experts and router by ``target_parameters``; the shared experts' and dense
layer's MLPs named so keep their LoRA, which 0.21.2 dropped); prefix tuning works on the attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._glm4 import Glm4Attention
from peftjax.models._llama import LlamaMLP
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralDecoderLayer,
    MixtralExperts,
    MixtralForCausalLM,
    MixtralModel,
    _MoeCheckpoints,
    expert_count,
    expert_dispatch,
)
from peftjax.nn._param_reader import ParamReader

ERNIE_EXPERTS = ExpertLayout("ERNIE 4.5 MoE", "mlp", gate="gate_proj", up="up_proj", down="down_proj")

# the Hub's name of the routing bias -> transformers 5's (in memory, and in PEFT's adapter keys)
HUB_BIAS, OUR_BIAS = ".mlp.moe_statics.e_score_correction_bias", ".mlp.gate.moe_statics.e_score_correction_bias"


def sparse_layer(config, layer_idx: int) -> bool:
    """transformers' rule: every ``moe_layer_interval``-th layer from ``moe_layer_start_index`` to
    ``moe_layer_end_index`` (-1: the last) holds the experts."""
    end = config.moe_layer_end_index
    end = config.num_hidden_layers - 1 if end == -1 else end
    return (layer_idx + 1) % config.moe_layer_interval == 0 and config.moe_layer_start_index <= layer_idx <= end


class Ernie4_5_MoeStatics(nnx.Module):
    """``mlp.gate.moe_statics``: ``e_score_correction_bias [1, experts]``, float32."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "e_score_correction_bias": ("e_score_correction_bias", False)}

    def __init__(self, config):
        self.e_score_correction_bias = nnx.Param(jnp.zeros((1, expert_count(config)), jnp.float32))


class Ernie4_5_MoeTopKRouter(ParamReader, nnx.Module):
    """``mlp.gate``: ``weight [experts, hidden]`` in float32 (LoRA-adaptable through
    ``target_parameters``, ``"gate.weight"``) and the routing bias (``moe_statics``)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (expert_count(config), config.hidden_size), jnp.float32))
        self.moe_statics = Ernie4_5_MoeStatics(config)
        self.top_k, self.norm_min = config.num_experts_per_tok, float(config.moe_norm_min)

    def __call__(self, x):
        """``(router logits [tokens, experts], weights [tokens, k], experts [tokens, k])``, in float32."""
        logits = x.astype(jnp.float32) @ self.param_value("weight").astype(jnp.float32).T
        scores = jax.nn.softmax(logits, axis=-1)
        bias = self.moe_statics.e_score_correction_bias.get_value().astype(jnp.float32)
        _, index = jax.lax.top_k(scores + bias, self.top_k)
        weights = jnp.take_along_axis(scores, index, axis=-1)
        return logits, weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), self.norm_min), index


class Ernie4_5_MoeSparseMoeBlock(nnx.Module):
    """The router, the routed experts and the shared experts of a sparse layer."""

    def __init__(self, config, layer_idx: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        del layer_idx
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dispatch = expert_dispatch(config)
        self.gate = Ernie4_5_MoeTopKRouter(config, **kw)
        self.experts = MixtralExperts(config, config.moe_intermediate_size, **kw)
        shared = config.moe_num_shared_experts or 0
        self.shared_experts = (LlamaMLP(config, intermediate_size=config.moe_intermediate_size * shared, **kw)
                               if shared > 0 else nnx.data(None))

    def __call__(self, x):
        """``(output [b, s, hidden], router logits [b * s, experts])``."""
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        logits, weights, index = self.gate(flat)
        out = self.experts.routed(flat, weights, index, self.dispatch).astype(x.dtype).reshape(b, s, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, logits


class Ernie4_5_MoeDecoderLayer(MixtralDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Glm4Attention  # ERNIE 4.5's pairwise rotation
    moe_class: ClassVar[type[nnx.Module]] = Ernie4_5_MoeSparseMoeBlock

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return sparse_layer(config, layer_idx)


class Ernie4_5_MoeModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = Ernie4_5_MoeDecoderLayer


def _renamed(state: Mapping[str, np.ndarray], old: str, new: str) -> dict[str, np.ndarray]:
    return {k.replace(old, new) if k.endswith(old) else k: v for k, v in state.items()}


class _ErnieCheckpoints(_MoeCheckpoints):
    """The Hub's routing-bias name besides its per-expert layout (read and written)."""

    expert_layout: ClassVar[ExpertLayout] = ERNIE_EXPERTS
    # the multi-token-prediction block, skipped as transformers skips it
    ignored_keys: ClassVar[tuple[str, ...]] = (r".*mtp.*",)

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        super().load_hf_state_dict(_renamed(state_dict, HUB_BIAS, OUR_BIAS), source=source, seed=seed)

    def checkpoint_layout(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _renamed(super().checkpoint_layout(state), OUR_BIAS, HUB_BIAS)


class Ernie4_5_MoeForCausalLM(_ErnieCheckpoints, MixtralForCausalLM):
    """ERNIE 4.5 MoE: ERNIE 4.5's attention, biased softmax routing with shared experts; the LM head
    has a bias with ``use_bias`` (refused with tied embeddings, whose head would drop it)."""

    model_class: ClassVar[type[nnx.Module]] = Ernie4_5_MoeModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.lm_head_bias = bool(getattr(config, "use_bias", False))
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


register(Ernie4_5_MoeForCausalLM, model_types=("ernie4_5_moe",), default=True)
