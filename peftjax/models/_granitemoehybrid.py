"""IBM Granite 4.0 (``model_type`` ``"granitemoehybrid"``: granite-4.0-h-micro, h-tiny, h-small, and
the attention-only granite-4.0-micro) in Flax NNX, under transformers' names.

A hybrid decoder: ``layer_types`` makes each layer's mixer a Mamba-2 layer (``mamba``, see
``_mamba2``; the Hub's ``"mamba"``) or Granite's attention (``self_attn``; the Hub's
``"attention"``), after ``input_layernorm``; then ``post_attention_layernorm`` and the routed
experts (``block_sparse_moe``, Granite MoE's; none with ``num_local_experts`` 0, the dense
releases) plus the shared expert (``shared_mlp``, always), each branch times
``residual_multiplier`` before its residual add. Granite's other multipliers as Granite's: the
embeddings', the attention's score scale, the logits'. No RoPE unless ``position_embedding_type``
is ``"rope"`` (the Granite 4.0 releases: ``"nope"``).

Generation keeps, per layer, the keys and values (attention) or the convolution's last inputs and
the scan's state (Mamba-2). The Mamba-2 layers have no keys and values to prepend a prefix to:
prefix tuning is refused; LoRA (PEFT has no default targets: name them), prompt tuning and the rest
work. ``scan_layers=True`` is refused where the two kinds mix. Packed rows (``segment_ids``) work:
each sequence attends within itself and its Mamba-2 layers convolve and scan it from zeros.
transformers has only the causal LM for this family.
"""

from __future__ import annotations

from typing import ClassVar

import jax
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._granite import GraniteAttention, scaled_embeddings
from peftjax.models._granitemoe import GraniteMoeForCausalLM, GraniteMoeSparseMoeBlock
from peftjax.models._granitemoeshared import GraniteMoeSharedMLP
from peftjax.models._hybrid import HybridDecoder, hybrid_cache
from peftjax.models._layer_kinds import checked_layer_types
from peftjax.models._llama import head_dim_of
from peftjax.models._mamba2 import Mamba2Mixer, mamba_cache
from peftjax.models._mixtral import MixtralForCausalLM
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import rotary_embedding
from peftjax.nn._norm import RMSNorm

LAYER_TYPES = ("linear_attention", "full_attention")


def granite_layer_types(config) -> tuple[str, ...]:
    """Each layer's type, checked (the config reads the Hub's ``mamba``/``attention`` as these).

    Raises:
      ValueError: an unknown type, or a list whose length is not ``num_hidden_layers``.
    """
    return checked_layer_types(config, LAYER_TYPES)


class GraniteMoeHybridAttention(GraniteAttention):
    """Granite's attention; every attention layer global (``layer_types`` names mixers, not windows)."""

    @staticmethod
    def mask_key(config, layer_idx: int):
        return None


class GraniteMoeHybridDecoderLayer(nnx.Module):
    """The mixer (``mamba`` or ``self_attn``) and the experts, Granite's residual multiplier on each."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_type = granite_layer_types(config)[layer_idx]
        if self.layer_type == "linear_attention":
            self.mamba = Mamba2Mixer(config, **kw)
        else:
            self.self_attn = GraniteMoeHybridAttention(config, layer_idx, **kw)
        self.has_experts = self.is_sparse(config, layer_idx)
        if self.has_experts:
            self.block_sparse_moe = GraniteMoeSparseMoeBlock(config, layer_idx, **kw)
        self.shared_mlp = GraniteMoeSharedMLP(config, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.residual_multiplier = float(config.residual_multiplier)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        """Whether the layer routes through experts (every layer, unless ``num_local_experts`` is 0)."""
        return bool(config.num_local_experts)

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        """``(x, cache, router logits or None)``; arguments as ``_hybrid.HybridDecoder``'s layers
        take them (``token_mask`` and ``segment_ids`` for the Mamba-2 layers)."""
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            a, cache = self.mamba(h, token_mask, cache, segment_ids)
        else:
            a, cache = self.self_attn(h, cos, sin, {None: mask}, cache, cache_index, None, dropout_rng)
        x = x + a * self.residual_multiplier
        h = self.post_attention_layernorm(x)
        out, logits = self.shared_mlp(h), None
        if self.has_experts:
            routed, logits = self.block_sparse_moe(h)
            out = routed + out
        return x + out * self.residual_multiplier, cache, logits


class GraniteMoeHybridModel(HybridDecoder):
    """The decoder stack: ``embed_tokens``, ``layers``, ``norm``."""

    layer_class: ClassVar[type[nnx.Module]] = GraniteMoeHybridDecoderLayer
    recurrent: ClassVar[str] = "Mamba-2"

    @staticmethod
    def layer_types(config) -> tuple[str, ...]:
        return granite_layer_types(config)

    @staticmethod
    def make_rotary(config):
        if config.position_embedding_type == "rope":
            return rotary_embedding(config, head_dim_of(config))
        return None  # "nope" (the releases), or None

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, output_router_logits: bool = False,
                 segment_ids=None) -> ModelOutput:
        """As ``HybridDecoder.__call__``, the embeddings (given ones too) scaled by
        ``embedding_multiplier``."""
        return super().__call__(None, attention_mask, position_ids, scaled_embeddings(self, input_ids, inputs_embeds),
                                cache, cache_index, prefix_kv, dropout_rng, output_router_logits, segment_ids)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, ``{"k", "v"}`` (``[batch, max_len, kv_heads,
    head_dim]``, attention) or Mamba-2's ``{"conv", "ssm"}`` (the state in float32)."""
    return hybrid_cache(config, granite_layer_types(config), batch, max_len, dtype, mamba_cache)


class GraniteMoeHybridForCausalLM(GraniteMoeForCausalLM):
    """Granite 4.0's causal LM (see the module docstring): ``aux_loss`` and ``router_logits`` as
    :class:`~peftjax.models.MixtralForCausalLM`'s (over the layers with experts), the logits divided
    by ``logits_scaling``; the Hub's expert names load and save as Granite MoE's."""

    model_class: ClassVar[type[nnx.Module]] = GraniteMoeHybridModel

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, output_router_logits: bool | None = None, dropout_rng=None,
                 logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :meth:`~peftjax.models.GraniteMoeForCausalLM.__call__`, without ``prefix_kv`` (the
        Mamba-2 layers have no keys to prefix)."""
        return MixtralForCausalLM.__call__(self, input_ids, attention_mask, position_ids, labels, inputs_embeds,
                                           cache, cache_index, None, output_router_logits, dropout_rng,
                                           logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


register(GraniteMoeHybridForCausalLM, model_types=("granitemoehybrid",), default=True)
