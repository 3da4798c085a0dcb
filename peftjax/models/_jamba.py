"""AI21's Jamba (``model_type`` ``"jamba"``: Jamba-v0.1, Jamba 1.5/1.6/1.7 Mini and Large, Jamba
Reasoning 3B) in Flax NNX, under transformers' names.

A hybrid decoder: layer ``i`` attends where ``i % attn_layer_period == attn_layer_offset``
(``self_attn``: grouped-query attention, no RoPE, no biases) and is a Mamba layer otherwise
(``mamba``: Mamba-1's mixer with RMSNorms of the time step's input, ``B`` and ``C``, see
``_mamba``); each after ``input_layernorm``, then ``pre_ff_layernorm`` and ``feed_forward``: a
mixture of ``num_experts`` experts where ``i % expert_layer_period == expert_layer_offset``
(``router``: the softmax's top ``num_experts_per_tok`` weights, not renormalised; Mixtral's fused
``experts``), a SwiGLU otherwise; ``final_layernorm`` last. ``output_router_logits`` adds the
load-balancing loss over the expert layers, as :class:`~peftjax.models.MixtralForCausalLM`.

The Hub's checkpoints hold each expert's ``gate_proj``/``up_proj``/``down_proj``; they load, as
transformers 5's fused layout does, and ``save_pretrained`` writes the Hub's. Generation keeps the
attention layers' keys and the Mamba layers' convolution inputs and states. Prefix tuning is
refused (the Mamba layers have no keys), so is LoRA on ``dt_proj`` (transformers multiplies by its
weight directly: PEFT's adapter there changes nothing). ``scan_layers=True`` is refused where
layers differ. ``JambaForSequenceClassification`` reads each row at its last real token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._expert_files import PerExpertFile, per_expert_layout
from peftjax.models._hybrid import HybridDecoder, hybrid_cache
from peftjax.models._llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaMLP,
)
from peftjax.models._mamba import MambaMixer, mamba_cache
from peftjax.models._mixtral import MixtralForCausalLM, MixtralSparseMoeBlock
from peftjax.models._outputs import ModelOutput
from peftjax.nn._dropout import split_keys
from peftjax.nn._norm import RMSNorm


def jamba_layer_types(config) -> list[str]:
    """Each layer's mixer by ``attn_layer_period`` and ``attn_layer_offset``, as transformers'
    ``JambaConfig.layer_types`` reads them.

    Raises:
      ValueError: an offset not below its period.
    """
    for what in ("attn", "expert"):
        period, offset = getattr(config, f"{what}_layer_period"), getattr(config, f"{what}_layer_offset")
        if not 0 <= offset < period:
            raise ValueError(f"jamba: {what}_layer_offset ({offset}) must be below {what}_layer_period ({period})")
    return ["full_attention" if i % config.attn_layer_period == config.attn_layer_offset else "linear_attention"
            for i in range(config.num_hidden_layers)]


def jamba_sparse(config, layer_idx: int) -> bool:
    """Whether layer ``layer_idx``'s feed-forward is the mixture of experts."""
    return config.num_experts > 1 and layer_idx % config.expert_layer_period == config.expert_layer_offset


class JambaAttention(LlamaAttention):
    """Grouped-query attention without RoPE or biases; every attention layer global."""

    @staticmethod
    def mask_key(config, layer_idx: int):
        return None


class JambaSparseMoeBlock(MixtralSparseMoeBlock):
    """``router`` and Mixtral's fused ``experts``; the top-k softmax weights not renormalised."""

    router_name: ClassVar[str] = "router"

    @staticmethod
    def renormalises(config) -> bool:
        return False


class JambaDecoderLayer(nnx.Module):
    """The mixer (``mamba`` or ``self_attn``) and the ``feed_forward``, each pre-normed and added
    to the residual."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_type = jamba_layer_types(config)[layer_idx]
        if self.layer_type == "linear_attention":
            self.mamba = MambaMixer(config, **kw)
        else:
            self.self_attn = JambaAttention(config, layer_idx, **kw)
        self.sparse = jamba_sparse(config, layer_idx)
        self.feed_forward = (JambaSparseMoeBlock(config, layer_idx, **kw) if self.sparse else LlamaMLP(config, **kw))
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return jamba_sparse(config, layer_idx)

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        """``(x, cache, router logits or None)``; arguments as ``_hybrid.HybridDecoder``'s layers
        take them."""
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            a, cache = self.mamba(h, token_mask, cache, segment_ids)
        else:
            (attn_key,) = split_keys(dropout_rng, 1)
            a, cache = self.self_attn(h, None, None, {None: mask}, cache, cache_index, None, attn_key)
        x = x + a
        out, logits = self.feed_forward(self.pre_ff_layernorm(x)), None
        if self.sparse:
            out, logits = out
        return x + out, cache, logits


class JambaModel(HybridDecoder):
    """The decoder stack: ``embed_tokens``, ``layers``, ``final_layernorm``."""

    layer_class: ClassVar[type[nnx.Module]] = JambaDecoderLayer
    norm_name: ClassVar[str] = "final_layernorm"
    recurrent: ClassVar[str] = "Mamba"

    @staticmethod
    def layer_types(config) -> list[str]:
        """Each layer's mixer, and its experts where it has them (scanning needs both alike)."""
        return [f"{t} + experts" if jamba_sparse(config, i) else t for i, t in enumerate(jamba_layer_types(config))]

    @staticmethod
    def make_rotary(config):
        return None


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, ``{"k", "v"}`` (attention) or Mamba's ``{"conv", "ssm"}``."""
    return hybrid_cache(config, jamba_layer_types(config), batch, max_len, dtype, mamba_cache)


EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class _JambaCheckpoints:
    """Reads the Hub's per-expert layout and transformers 5's fused one; writes the Hub's."""

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        super().load_hf_state_dict(PerExpertFile(state_dict, source, "feed_forward", EXPERTS), source=source,
                                   seed=seed)

    def checkpoint_layout(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return per_expert_layout(state, "feed_forward", EXPERTS)


class JambaForCausalLM(_JambaCheckpoints, LlamaForCausalLM):
    """Jamba's causal LM (see the module docstring)."""

    model_class: ClassVar[type[nnx.Module]] = JambaModel

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, output_router_logits: bool | None = None, dropout_rng=None,
                 logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :meth:`~peftjax.models.MixtralForCausalLM.__call__`, without ``prefix_kv`` (the Mamba
        layers have no keys to prefix)."""
        return MixtralForCausalLM.__call__(self, input_ids, attention_mask, position_ids, labels, inputs_embeds,
                                           cache, cache_index, None, output_router_logits, dropout_rng,
                                           logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)

class JambaForSequenceClassification(_JambaCheckpoints, LlamaForSequenceClassification):
    """Sequence classification: the decoder plus a ``score`` head read at each row's last real
    token (transformers' generic decoder classifier; no router loss)."""

    model_class: ClassVar[type[nnx.Module]] = JambaModel


register(JambaForCausalLM, model_types=("jamba",), default=True)
register(JambaForSequenceClassification)
