"""TII's Falcon-H1 (``model_type`` ``"falcon_h1"``: Falcon-H1 0.5B to 34B, Falcon-H1R, Falcon-H1-Tiny)
in Flax NNX, under transformers' names.

Every layer runs a Mamba-2 mixer and an attention in parallel on its normed input
(``input_layernorm``) and adds both to the residual, then a SwiGLU (``pre_ff_layernorm``,
``feed_forward``); ``final_layernorm`` last. µP multipliers throughout, as transformers applies
them: the embeddings of ids times ``embedding_multiplier`` (given embeddings as they are), the
mixer's input times ``ssm_in_multiplier`` and ``in_proj``'s five sections (gate, ``x``, ``B``,
``C``, time steps) times ``ssm_multipliers``, its output times ``ssm_out_multiplier``; the
attention's input times ``attention_in_multiplier``, its keys times ``key_multiplier`` (before
RoPE), its output times ``attention_out_multiplier``; the SwiGLU's gate times
``mlp_multipliers[0]`` and its output times ``mlp_multipliers[1]``; the logits times
``lm_head_multiplier``. The mixer's width is ``mamba_d_ssm`` where given; its gated RMSNorm is
optional (``mamba_rms_norm``; without it the scan's output is only gated) and normalises before
the gate with ``mamba_norm_before_gate``; ``out_proj`` is biased with ``projectors_bias``.

Generation keeps both mixers' state in each layer: keys and values, convolution inputs and the
scan's state. Every layer is alike, so ``scan_layers=True`` stacks them. Prefix tuning is refused
(the layers' Mamba-2 half has no keys to prefix); so is LoRA on the mixers' ``out_proj`` and
``conv1d``, as PEFT refuses them for this family. transformers has only the causal LM.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._hybrid import HybridDecoder
from peftjax.models._llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, head_dim_of
from peftjax.models._mamba2 import Mamba2Mixer, mamba_cache, mamba_width
from peftjax.models._outputs import ModelOutput
from peftjax.nn._dropout import split_keys
from peftjax.nn._functional import swiglu
from peftjax.nn._norm import RMSNorm


def mup_sections(config) -> tuple[tuple[int, float], ...]:
    """``in_proj``'s output sections (gate, ``x``, ``B``, ``C``, time steps) with their
    ``ssm_multipliers``: transformers' ``compute_mup_vector``, as ``(size, multiplier)`` pairs."""
    width, groups = mamba_width(config), config.mamba_n_groups * config.mamba_d_state
    sizes = (width, width, groups, groups, config.mamba_n_heads)
    return tuple((n, float(m)) for n, m in zip(sizes, config.ssm_multipliers, strict=True))


class FalconH1Mixer(Mamba2Mixer):
    """Mamba-2 with Falcon-H1's input and section multipliers and its optional gated norm."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ssm_in_multiplier = float(config.ssm_in_multiplier)
        self.mup = mup_sections(config)
        self.rms_norm, self.norm_before_gate = bool(config.mamba_rms_norm), bool(config.mamba_norm_before_gate)
        if not self.rms_norm:
            del self.norm  # transformers has no weights there

    def project(self, x):
        multipliers = jnp.concatenate([jnp.full((n,), m, x.dtype) for n, m in self.mup])  # a constant
        return self.in_proj(x * self.ssm_in_multiplier) * multipliers[None, None, :]

    def gated(self, y, z):
        gate = jax.nn.silu(z.astype(jnp.float32))
        if not self.rms_norm:
            return y * gate
        if not self.norm_before_gate:
            return self.norm(y, z)
        h = y.astype(jnp.float32)
        grouped = h.reshape(*h.shape[:-1], self.n_groups, -1)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + self.norm.epsilon)
        scale = self.norm.scale.get_value().astype(jnp.float32)
        return grouped.reshape(h.shape) * scale.reshape((1,) * (h.ndim - 1) + (-1,)) * gate


class FalconH1Attention(LlamaAttention):
    """Llama's attention, its keys times ``key_multiplier`` before RoPE; every layer global."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.key_multiplier = float(config.key_multiplier)

    @staticmethod
    def mask_key(config, layer_idx: int):
        return None

    def project(self, x):
        q, k, v = super().project(x)
        return q, k * jnp.asarray(self.key_multiplier, k.dtype), v


class FalconH1MLP(LlamaMLP):
    """The SwiGLU, its gate times ``mlp_multipliers[0]``, its output times ``mlp_multipliers[1]``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_multiplier, self.down_multiplier = (float(m) for m in config.mlp_multipliers)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x) * self.gate_multiplier, self.up_proj(x))) * self.down_multiplier


class FalconH1DecoderLayer(nnx.Module):
    """``mamba`` and ``self_attn`` in parallel on ``input_layernorm``'s output, then ``feed_forward``."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mamba = FalconH1Mixer(config, **kw)
        self.self_attn = FalconH1Attention(config, layer_idx, **kw)
        self.feed_forward = FalconH1MLP(config, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.multipliers = (float(config.ssm_out_multiplier), float(config.attention_in_multiplier),
                            float(config.attention_out_multiplier))

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return False

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        """``(x, cache, None)``; arguments as ``_hybrid.HybridDecoder``'s layers take them;
        ``cache`` holds both mixers' (``{"k", "v", "conv", "ssm"}``)."""
        ssm_out, attention_in, attention_out = self.multipliers
        h = self.input_layernorm(x)
        mamba_cache_, kv = (None, None) if cache is None else (
            {"conv": cache["conv"], "ssm": cache["ssm"]}, {"k": cache["k"], "v": cache["v"]})
        m, mamba_cache_ = self.mamba(h, token_mask, mamba_cache_, segment_ids)
        (attn_key,) = split_keys(dropout_rng, 1)
        a, kv = self.self_attn(h * attention_in, cos, sin, {None: mask}, kv, cache_index, None, attn_key)
        x = x + (m * ssm_out + a * attention_out)
        if cache is not None:
            cache = {**kv, **mamba_cache_}
        return x + self.feed_forward(self.pre_ff_layernorm(x)), cache, None


class FalconH1Model(HybridDecoder):
    """The decoder stack: ``embed_tokens``, ``layers``, ``final_layernorm``."""

    layer_class: ClassVar[type[nnx.Module]] = FalconH1DecoderLayer
    norm_name: ClassVar[str] = "final_layernorm"
    recurrent: ClassVar[str] = "Mamba-2"

    @staticmethod
    def layer_types(config) -> list[str]:
        return ["hybrid"] * config.num_hidden_layers  # every layer alike

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, output_router_logits: bool = False,
                 segment_ids=None) -> ModelOutput:
        """As ``HybridDecoder.__call__``, the embeddings of ``input_ids``
        times ``embedding_multiplier`` (given ``inputs_embeds`` as they are, as transformers)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(jnp.asarray(input_ids)) * float(self.config.embedding_multiplier)
        return super().__call__(None, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                                dropout_rng, output_router_logits, segment_ids)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, the attention's ``{"k", "v"}`` ``[batch, max_len,
    kv_heads, head_dim]`` and Mamba-2's ``{"conv", "ssm"}``."""
    kv = (batch, max_len, config.num_key_value_heads or config.num_attention_heads, head_dim_of(config))
    return [{"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype), **mamba_cache(config, batch, dtype)}
            for _ in range(config.num_hidden_layers)]


class FalconH1ForCausalLM(LlamaForCausalLM):
    """Falcon-H1's causal LM (see the module docstring): the logits times ``lm_head_multiplier``."""

    model_class: ClassVar[type[nnx.Module]] = FalconH1Model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv`` (the Mamba-2 half
        of each layer has no keys to prefix)."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def head_input(self, h):
        return h * jnp.asarray(self.config.lm_head_multiplier, h.dtype)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


register(FalconH1ForCausalLM, model_types=("falcon_h1",), default=True)
