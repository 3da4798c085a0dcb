"""IBM Granite MoE (``model_type`` ``"granitemoe"``: granite-3.0/3.1 1B-A400M and 3B-A800M) in Flax
NNX, under transformers' names.

Granite's multipliers (``_granite``: embeddings, attention scores, each branch before its
residual add, the logits) over Mixtral's experts (``_mixtral``: fused ``gate_up_proj`` and
``down_proj``, the load-balancing loss), in ``block_sparse_moe`` with its router at
``block_sparse_moe.router`` (a token's weights: the softmax of its top ``num_experts_per_tok``
logits, Mixtral's renormalised top k). The Hub's checkpoints name the experts
``block_sparse_moe.input_linear`` / ``output_linear`` and the router ``router.layer``: both that
layout and transformers 5's in-memory one load, and ``save_pretrained`` writes the Hub's, as
transformers does. transformers has only the causal LM for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._granite import GraniteAttention, attention_residual, scaled_embeddings
from peftjax.models._mixtral import (
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralSparseMoeBlock,
    _MoeCheckpoints,
)
from peftjax.models._outputs import ModelOutput

# the Hub's names of the block's tensors -> transformers 5's (in memory, and in PEFT's adapter keys)
HUB_NAMES = {"input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj",
             "router.layer.weight": "router.weight"}
_BLOCK = re.compile(r"^(?P<pre>.*\.block_sparse_moe)\.(?P<name>.+)$")


def _renamed(state: Mapping[str, np.ndarray], names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """``state`` with each ``...block_sparse_moe.<name>`` key renamed by ``names`` (others as they are)."""
    out = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        out[f"{m['pre']}.{names[m['name']]}" if m and m["name"] in names else key] = value
    return out


class GraniteMoeSparseMoeBlock(MixtralSparseMoeBlock):
    router_name: ClassVar[str] = "router"


class GraniteMoeDecoderLayer(MixtralDecoderLayer):
    """Granite's attention and residual multiplier over the experts, in ``block_sparse_moe``."""

    attention_class: ClassVar[type[nnx.Module]] = GraniteAttention
    moe_class: ClassVar[type[nnx.Module]] = GraniteMoeSparseMoeBlock
    mlp_name: ClassVar[str] = "block_sparse_moe"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.residual_multiplier = float(config.residual_multiplier)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        x, cache = attention_residual(self, x, cos, sin, masks, cache, cache_index, prefix, dropout_rng)
        out, logits = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + out * self.residual_multiplier, cache, logits


class GraniteMoeModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = GraniteMoeDecoderLayer

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, output_router_logits: bool = False,
                 segment_ids=None) -> ModelOutput:
        """As :meth:`~peftjax.models.MixtralModel.__call__`, the embeddings (given ones too)
        scaled by ``embedding_multiplier``."""
        return super().__call__(None, attention_mask, position_ids, scaled_embeddings(self, input_ids, inputs_embeds),
                                cache, cache_index, prefix_kv, dropout_rng, output_router_logits=output_router_logits,
                                segment_ids=segment_ids)


class GraniteMoeForCausalLM(MixtralForCausalLM):
    """Granite MoE: Granite's multipliers over Mixtral's experts (see the module docstring)."""

    model_class: ClassVar[type[nnx.Module]] = GraniteMoeModel

    def head_input(self, h):
        return h / jnp.asarray(self.config.logits_scaling, h.dtype)

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        # past Mixtral's per-expert reader (its Hub block is also named block_sparse_moe)
        super(_MoeCheckpoints, self).load_hf_state_dict(_renamed(state_dict, HUB_NAMES), source=source, seed=seed)

    def checkpoint_layout(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _renamed(state, {v: k for k, v in HUB_NAMES.items()})

    fused_adapter_tensors = None  # transformers 4's experts were fused too: no per-expert adapters to fuse


register(GraniteMoeForCausalLM, model_types=("granitemoe",), default=True)
