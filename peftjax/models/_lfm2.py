"""Liquid AI's LFM2 (``model_type`` ``"lfm2"``: LFM2-350M, 700M, 1.2B, 2.6B) in Flax NNX, under
transformers' names.

A hybrid decoder: ``layer_types`` makes each layer a gated short convolution (``conv``) or a full
attention (``self_attn``), each after ``operator_norm`` and followed by ``ffn_norm`` and a SwiGLU
``feed_forward`` (``w1`` gate, ``w3`` up, ``w2`` down, its width ``intermediate_size`` cut to two
thirds, times ``block_ffn_dim_multiplier`` and rounded up to ``block_multiple_of`` with
``block_auto_adjust_ff_dim``, as transformers builds it).

- ``conv``: ``in_proj`` gives ``B``, ``C`` and ``x`` (in that order); ``B * x`` goes through a causal
  depthwise ``conv`` of ``conv_L_cache`` taps (a bias with ``conv_bias``, as on both projections),
  the result times ``C`` through ``out_proj``. Padded tokens are zeroed before ``in_proj``, as
  transformers' ``apply_mask_to_padding_states`` does, so left padding feeds the convolution zeros;
- ``self_attn``: Llama's grouped-query attention with per-head RMSNorms on queries and keys
  (``q_layernorm``, ``k_layernorm``) before RoPE, its output projection ``out_proj``; no biases;
- the final norm is ``embedding_norm``, the head tied to the embeddings by default.

Generation keeps, per layer, the keys and values (attention) or the convolution's last
``conv_L_cache - 1`` inputs. The convolution layers have no keys and values to prepend a prefix
to: prefix tuning is refused; LoRA (PEFT has no default targets: name them), prompt tuning and the
rest work. ``scan_layers=True`` is refused where the two kinds mix. Packed rows (``segment_ids``)
work: each sequence attends within itself and its convolution reads nothing across its start.
transformers has only the causal LM for this family.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._hybrid import hybrid_inputs
from peftjax.models._layer_kinds import checked_layer_types
from peftjax.models._llama import LlamaAttention, LlamaForCausalLM, LlamaModel, head_dim_of
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import rotary_embedding
from peftjax.nn._delta_rule import causal_depthwise_conv
from peftjax.nn._functional import swiglu
from peftjax.nn._norm import RMSNorm
from peftjax.nn._scan import run_layers

LAYER_TYPES = ("conv", "full_attention")


def lfm2_layer_types(config) -> tuple[str, ...]:
    """Each layer's type, checked (``layer_types``, which the config derives from ``full_attn_idxs``).

    Raises:
      ValueError: an unknown type, or a list whose length is not ``num_hidden_layers``.
    """
    return checked_layer_types(config, LAYER_TYPES)


def feed_forward_width(config) -> int:
    """The SwiGLU's width, as transformers' ``Lfm2MLP`` computes it."""
    width = config.intermediate_size
    if getattr(config, "block_auto_adjust_ff_dim", False):
        width = int(2 * width / 3)
        multiplier = getattr(config, "block_ffn_dim_multiplier", None)
        if multiplier is not None:
            width = int(multiplier * width)
            step = config.block_multiple_of
            width = step * ((width + step - 1) // step)
    return width


class Lfm2MLP(nnx.Module):
    """``feed_forward``: ``w2(silu(w1(x)) * w3(x))``, no biases."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, width = config.hidden_size, feed_forward_width(config)
        self.w1 = nnx.Linear(h, width, **kw)
        self.w3 = nnx.Linear(h, width, **kw)
        self.w2 = nnx.Linear(width, h, **kw)

    def __call__(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Lfm2Attention(LlamaAttention):
    """Llama's grouped-query attention (no biases) with per-head query and key RMSNorms before RoPE,
    its output projection ``out_proj``, global in every attention layer and without dropout (as
    transformers' has none)."""

    out_name: ClassVar[str] = "out_proj"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(epsilon=config.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_layernorm = RMSNorm(self.head_dim, **norm)
        self.k_layernorm = RMSNorm(self.head_dim, **norm)

    def set_layout(self, config, layer_idx: int) -> None:
        super().set_layout(config, layer_idx)
        self.dropout_rate = 0.0

    @staticmethod
    def mask_key(config, layer_idx: int):
        return None  # the decoder's one causal mask (its layer_types name convolutions, not windows)

    def project(self, x):
        q, k, v = super().project(x)
        return self.q_layernorm(q), self.k_layernorm(k), v


class Lfm2Conv1d(nnx.Module):
    """``conv``: the depthwise causal convolution's ``weight`` in torch's ``[channels, 1, kernel]``
    layout, and its ``bias`` with ``conv_bias``."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False), "bias": ("bias", False)}

    def __init__(self, channels: int, kernel: int, *, use_bias: bool, param_dtype, init_std: float, rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.weight = nnx.Param(init(rngs.params(), (channels, 1, kernel), param_dtype))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype)) if use_bias else nnx.data(None)

    def __call__(self, x, state=None, segment_ids=None):
        out, state = causal_depthwise_conv(x, self.weight.get_value(), state, segment_ids)
        if self.bias is not None:
            out = out + self.bias.get_value().astype(out.dtype)[None, None, :]
        return out, state


class Lfm2ShortConv(nnx.Module):
    """``conv``: the gated short convolution (see the module's docstring)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, bias = config.hidden_size, bool(getattr(config, "conv_bias", False))
        kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv = Lfm2Conv1d(h, config.conv_L_cache, use_bias=bias, param_dtype=param_dtype,
                               init_std=config.initializer_range, rngs=rngs)
        self.in_proj = nnx.Linear(h, 3 * h, **kw)
        self.out_proj = nnx.Linear(h, h, **kw)

    def __call__(self, x, token_mask=None, cache=None, segment_ids=None):
        """``token_mask``: ``[batch, seq]``, 0 on padding (``None``: none); ``cache``: ``{"conv"}``, the
        convolution's last inputs, or ``None``; ``segment_ids``: packed rows."""
        if token_mask is not None:
            x = x * token_mask[..., None].astype(x.dtype)
        gate_in, gate_out, values = jnp.split(self.in_proj(x), 3, axis=-1)
        mixed, state = self.conv(gate_in * values, None if cache is None else cache["conv"], segment_ids)
        new_cache = None if cache is None else {"conv": state.astype(cache["conv"].dtype)}
        return self.out_proj(gate_out * mixed), new_cache


class Lfm2DecoderLayer(nnx.Module):
    """``operator_norm``, the token mixer (``conv`` or ``self_attn``, by ``layer_types``), then
    ``ffn_norm`` and ``feed_forward``, each added to the residual."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_type = lfm2_layer_types(config)[layer_idx]
        if self.layer_type == "conv":
            self.conv = Lfm2ShortConv(config, **kw)
        else:
            self.self_attn = Lfm2Attention(config, layer_idx, **kw)
        self.feed_forward = Lfm2MLP(config, **kw)
        self.operator_norm = RMSNorm(config.hidden_size, epsilon=config.norm_eps, **kw)
        self.ffn_norm = RMSNorm(config.hidden_size, epsilon=config.norm_eps, **kw)

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, segment_ids=None):
        h = self.operator_norm(x)
        if self.layer_type == "conv":
            a, cache = self.conv(h, token_mask, cache, segment_ids)
        else:
            a, cache = self.self_attn(h, cos, sin, {None: mask}, cache, cache_index)
        x = x + a
        return x + self.feed_forward(self.ffn_norm(x)), cache


class Lfm2Model(LlamaModel):
    """The decoder stack: ``embed_tokens``, ``layers``, ``embedding_norm``."""

    layer_class: ClassVar[type[nnx.Module]] = Lfm2DecoderLayer
    norm_name: ClassVar[str] = "embedding_norm"

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        return RMSNorm(config.hidden_size, epsilon=config.norm_eps, **kw)

    @staticmethod
    def make_rotary(config):
        return rotary_embedding(config, head_dim_of(config))

    @staticmethod
    def check_scan(config) -> None:
        """Refuses ``scan_layers=True`` where convolution and attention layers mix."""
        types = lfm2_layer_types(config)
        if len(set(types)) > 1:
            raise ValueError(f"scan_layers=True needs alike layers; lfm2's layer_types mix {sorted(set(types))}")

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """Runs the decoder. With ``cache`` (see :meth:`Lfm2ForCausalLM.init_cache`),
        ``attention_mask`` covers the cache's slots and the call's tokens sit at ``cache_index``.
        ``segment_ids``: packed rows: each sequence attends to itself, its convolution reads
        nothing across its start. LFM2 has no dropout: ``dropout_rng`` changes nothing.

        Raises:
          ValueError: ``prefix_kv`` given (the convolution layers have no keys to prefix).
        """
        del dropout_rng
        x, _, segment_ids, pos, mask, token_mask, cos, sin = hybrid_inputs(
            self, input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv, segment_ids,
            recurrent="convolution")
        if cache is None:  # training and scoring: rematerialised where asked
            x = run_layers(self.layers, lambda layer, h, k: layer(h, cos, sin, mask, token_mask,
                                                                  segment_ids=segment_ids)[0], x, self.remat, None)
            return ModelOutput(last_hidden_state=self.final_norm(x), past_key_values=None)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, mask, token_mask, cache[i], pos.start, segment_ids)
            new_cache.append(layer_cache)
        return ModelOutput(last_hidden_state=self.final_norm(x), past_key_values=new_cache)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, ``{"k", "v"}`` (``[batch, max_len, kv_heads, head_dim]``,
    attention) or ``{"conv" [batch, conv_L_cache - 1, hidden]}`` (convolution)."""
    kv = (batch, max_len, config.num_key_value_heads or config.num_attention_heads, head_dim_of(config))
    conv = (batch, config.conv_L_cache - 1, config.hidden_size)
    return [{"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype)} if t == "full_attention"
            else {"conv": jnp.zeros(conv, dtype)} for t in lfm2_layer_types(config)]


class Lfm2ForCausalLM(LlamaForCausalLM):
    """LFM2's causal LM: ``model`` (the hybrid decoder) and ``lm_head`` (tied by default)."""

    model_class: ClassVar[type[nnx.Module]] = Lfm2Model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv`` (the convolution
        layers have no keys to prefix)."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


register(Lfm2ForCausalLM, model_types=("lfm2",), default=True)
