"""Qwen3.5's text models (``qwen3_5_text``, ``qwen3_5_moe_text``) in Flax NNX, with transformers' names.

A hybrid decoder: ``layer_types`` makes each layer a Gated DeltaNet linear attention
(``linear_attn``; three in four by default) or a gated full attention (``self_attn``), each
followed by a SwiGLU MLP.

- ``linear_attn``: ``in_proj_qkv`` through a causal depthwise ``conv1d`` and SiLU gives queries,
  keys and values; ``in_proj_b`` the write strength ``beta = sigmoid(b)``; ``in_proj_a`` the decay
  ``g = -exp(A_log) * softplus(a + dt_bias)``; the gated delta rule (``peftjax.nn._delta_rule``)
  mixes the tokens; ``norm`` (RMSNorm, then times ``silu(in_proj_z(x))``) and ``out_proj``. Padded
  tokens are zeroed before it, as transformers' ``apply_mask_to_padding_states`` does, so that
  left padding leaves the state empty;
- ``self_attn``: ``q_proj`` gives each head's query and an output gate, ``q_norm``/``k_norm`` per
  head, RoPE on the first ``partial_rotary_factor`` (0.25) of each head, the output times
  ``sigmoid(gate)`` before ``o_proj``;
- every RMSNorm but the gated one multiplies by ``1 + weight`` (Gemma's).

Generation keeps, per layer, the keys and values (full attention) or the convolution's last
inputs and the delta rule's state (linear attention). The linear layers have no keys and values
to prepend a prefix to: prefix tuning is refused; LoRA, prompt tuning and the rest work.
``scan_layers=True`` is refused where the two kinds mix (their layers differ in structure).
The causal LMs take packed rows (``segment_ids``, the Trainer's default): each sequence attends
within itself, and its convolution and delta-rule state start from zeros, as it would alone.

Qwen3.5-MoE (``Qwen3_5MoeForCausalLM``) is the same decoder with Qwen2-MoE's block as every
layer's MLP (routed experts, top-k renormalised, and a shared expert weighted by
``sigmoid(shared_expert_gate(x))``), Mixtral's load-balancing loss and checkpoint layouts.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout, token_classifier_dropout
from peftjax.models._gemma2 import GemmaRMSNorm
from peftjax.models._hybrid import HybridDecoder, hybrid_cache
from peftjax.models._layer_kinds import checked_layer_types
from peftjax.models._llama import LlamaForCausalLM, LlamaForSequenceClassification, LlamaMLP, head_dim_of
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralForCausalLM,
    _MoeCheckpoints,
)
from peftjax.models._losses import token_labels_loss
from peftjax.models._modeling import PreTrainedModel
from peftjax.models._outputs import ModelOutput
from peftjax.models._qwen2_moe import Qwen2MoeSparseMoeBlock
from peftjax.models._qwen3_moe import QWEN_MOE_EXPERTS
from peftjax.models._rope import apply_rotary
from peftjax.models._vision_language import TextOfVisionLanguage
from peftjax.nn._delta_rule import causal_depthwise_conv, chunk_gated_delta_rule, recurrent_gated_delta_rule
from peftjax.nn._dropout import split_keys

LAYER_TYPES = ("linear_attention", "full_attention")


def qwen3_5_layer_types(config) -> tuple[str, ...]:
    """Each layer's type, checked.

    Raises:
      ValueError: an unknown type, or a list whose length is not ``num_hidden_layers``.
    """
    return checked_layer_types(config, LAYER_TYPES)


class Qwen3_5Attention(nnx.Module):
    """Gated full attention: ``q_proj`` gives queries and an output gate per head."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        del layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or self.num_heads
        self.head_dim = head_dim_of(config)
        self.scale = self.head_dim**-0.5
        self.dropout_rate = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        bias = bool(getattr(config, "attention_bias", False))
        h, d = config.hidden_size, self.head_dim
        kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(h, self.num_heads * d * 2, **kw)
        self.k_proj = nnx.Linear(h, self.num_kv_heads * d, **kw)
        self.v_proj = nnx.Linear(h, self.num_kv_heads * d, **kw)
        self.o_proj = nnx.Linear(self.num_heads * d, h, **kw)
        norm = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = GemmaRMSNorm(d, **norm)
        self.k_norm = GemmaRMSNorm(d, **norm)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, dropout_rng=None):
        b, s, _ = x.shape
        d = self.head_dim
        q_and_gate = self.q_proj(x).reshape(b, s, self.num_heads, 2 * d)
        q, gate = q_and_gate[..., :d], q_and_gate[..., d:].reshape(b, s, -1)
        q = apply_rotary(self.q_norm(q), cos, sin)
        k = apply_rotary(self.k_norm(self.k_proj(x).reshape(b, s, self.num_kv_heads, d)), cos, sin)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, d)
        if cache is not None:
            cache = attn.update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]
        out = attn.dot_product_attention(q, k, v, mask, scale=self.scale, dropout_rate=self.dropout_rate,
                                         dropout_rng=dropout_rng,
                                         causal_offset=attn.causal_offset(cache, None, cache_index))
        return self.o_proj(out.reshape(b, s, -1) * jax.nn.sigmoid(gate)), cache


class Qwen3_5Conv1d(nnx.Module):
    """``conv1d``: the depthwise causal convolution's ``weight`` in torch's ``[channels, 1, kernel]``
    layout (no bias, as transformers builds it)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False)}

    def __init__(self, channels: int, kernel: int, *, param_dtype, init_std: float, rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.weight = nnx.Param(init(rngs.params(), (channels, 1, kernel), param_dtype))

    def __call__(self, x, state=None, segment_ids=None):
        return causal_depthwise_conv(x, self.weight.get_value(), state, segment_ids)


class Qwen3_5RMSNormGated(nnx.RMSNorm):
    """RMSNorm (times ``weight``, which starts at 1) then times ``silu(gate)``, as transformers'
    ``Qwen3_5RMSNormGated``: the norm in float32, its product with the weight in the input's
    dtype, the gate's in float32."""

    def __call__(self, x, gate):
        h = x.astype(jnp.float32)
        h = (h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.epsilon)).astype(x.dtype)
        h = self.scale.get_value().astype(x.dtype).reshape((1,) * (h.ndim - 1) + (-1,)) * h
        return (h * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class Qwen3_5GatedDeltaNet(nnx.Module):
    """``linear_attn``: Gated DeltaNet (see the module's docstring)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"dt_bias": ("dt_bias", False), "A_log": ("A_log", False)}

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        del layer_idx
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"linear_num_value_heads ({self.num_v_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.num_k_heads})")
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.num_k_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        h = config.hidden_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.make_projections(h, **kw)
        self.conv1d = Qwen3_5Conv1d(2 * self.key_dim + self.value_dim, self.conv_kernel_size, param_dtype=param_dtype,
                                    init_std=config.initializer_range, rngs=rngs)
        self.dt_bias = nnx.Param(jnp.ones((self.num_v_heads,), param_dtype))
        a = jax.random.uniform(rngs.params(), (self.num_v_heads,), jnp.float32, 0.01, 16.0)
        self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))
        self.norm = Qwen3_5RMSNormGated(self.head_v_dim, epsilon=config.rms_norm_eps, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs)
        self.out_proj = nnx.Linear(self.value_dim, h, **kw)

    def make_projections(self, hidden: int, **kw) -> None:
        """The input projections: ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""
        self.in_proj_qkv = nnx.Linear(hidden, 2 * self.key_dim + self.value_dim, **kw)
        self.in_proj_z = nnx.Linear(hidden, self.value_dim, **kw)
        self.in_proj_b = nnx.Linear(hidden, self.num_v_heads, **kw)
        self.in_proj_a = nnx.Linear(hidden, self.num_v_heads, **kw)

    def project(self, x):
        """``(qkv, z, b, a)``: the convolution's input ``[batch, seq, 2 * key_dim + value_dim]``
        (queries, keys, values, each head after head), the gate ``z`` ``[batch, seq, value_heads,
        value_head_dim]``, and ``b``, ``a`` ``[batch, seq, value_heads]``."""
        b, s, _ = x.shape
        z = self.in_proj_z(x).reshape(b, s, self.num_v_heads, self.head_v_dim)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    def __call__(self, x, token_mask=None, cache=None, segment_ids=None):
        """``token_mask``: ``[batch, seq]``, 0 on padding (``None``: none); ``cache``: ``{"conv",
        "state"}``, the convolution's last inputs and the delta rule's state, or ``None``;
        ``segment_ids``: packed rows, each sequence convolved and recurred from zeros."""
        if token_mask is not None:
            x = x * token_mask[..., None].astype(x.dtype)
        b, s, _ = x.shape
        qkv, z, beta, a = self.project(x)
        beta, a = jax.nn.sigmoid(beta), a.astype(jnp.float32)
        per_head = lambda p: p.get_value().astype(jnp.float32)[None, None, :]  # noqa: E731
        g = -jnp.exp(per_head(self.A_log)) * jax.nn.softplus(a + per_head(self.dt_bias))
        mixed, conv_state = self.conv1d(qkv, None if cache is None else cache["conv"], segment_ids)
        mixed = jax.nn.silu(mixed)
        q = mixed[..., : self.key_dim].reshape(b, s, self.num_k_heads, self.head_k_dim)
        k = mixed[..., self.key_dim: 2 * self.key_dim].reshape(b, s, self.num_k_heads, self.head_k_dim)
        v = mixed[..., 2 * self.key_dim:].reshape(b, s, self.num_v_heads, self.head_v_dim)
        if cache is not None and s == 1:  # one-token decoding, as transformers steps it
            out, state = recurrent_gated_delta_rule(q, k, v, g, beta, cache["state"])
        else:
            out, state = chunk_gated_delta_rule(q, k, v, g, beta, None if cache is None else cache["state"],
                                                segment_ids=segment_ids)
        out = self.norm(out, z).reshape(b, s, -1)
        new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype),
                                                "state": state.astype(cache["state"].dtype)}
        return self.out_proj(out), new_cache


class Qwen3_5DecoderLayer(nnx.Module):
    """Pre-norm token mixer (``linear_attn`` or ``self_attn``, by ``layer_types``) and MLP."""

    linear_attention_class: ClassVar[type[nnx.Module]] = Qwen3_5GatedDeltaNet

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_type = qwen3_5_layer_types(config)[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = self.linear_attention_class(config, layer_idx, **kw)
        else:
            self.self_attn = Qwen3_5Attention(config, layer_idx, **kw)
        self.mlp = self.make_mlp(config, layer_idx, **kw)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s MLP is a mixture of experts (none here)."""
        return False

    @staticmethod
    def make_mlp(config, layer_idx: int, **kw) -> nnx.Module:
        """``mlp``: SwiGLU here; the MoE model's sparse block returns ``(out, router logits)``."""
        return LlamaMLP(config, **kw)

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        """``(x, cache, router logits or None)``. ``mask``: the full attention's ``[batch, 1, q,
        k]``; ``token_mask``: the linear attention's ``[batch, seq]`` padding mask or ``None``;
        ``dropout_rng``: the attention dropout's key (training) or ``None``; ``segment_ids``:
        packed rows (the linear attention's; the full attention's are in ``mask``)."""
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            a, cache = self.linear_attn(h, token_mask, cache, segment_ids)
        else:
            (attn_key,) = split_keys(dropout_rng, 1)
            a, cache = self.self_attn(h, cos, sin, mask, cache, cache_index, attn_key)
        x = x + a
        out, logits = self.mlp(self.post_attention_layernorm(x)), None
        if isinstance(out, tuple):
            out, logits = out
        return x + out, cache, logits


class Qwen3_5TextModel(HybridDecoder):
    """The decoder stack: ``embed_tokens``, ``layers``, ``norm`` (RMSNorm ``1 + weight``)."""

    layer_class: ClassVar[type[nnx.Module]] = Qwen3_5DecoderLayer
    recurrent: ClassVar[str] = "linear attention"

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        return GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    @staticmethod
    def layer_types(config) -> tuple[str, ...]:
        return qwen3_5_layer_types(config)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, ``{"k", "v"}`` (``[batch, max_len, kv_heads,
    head_dim]``, full attention) or ``{"conv" [batch, kernel - 1, channels], "state" [batch,
    value_heads, key_dim, value_dim]}`` (linear attention; the state in float32, as computed)."""
    return hybrid_cache(config, qwen3_5_layer_types(config), batch, max_len, dtype, _linear_attention_cache)


def _linear_attention_cache(config, batch: int, dtype) -> dict[str, jax.Array]:
    conv = (batch, config.linear_conv_kernel_dim - 1,
            2 * config.linear_num_key_heads * config.linear_key_head_dim
            + config.linear_num_value_heads * config.linear_value_head_dim)
    state = (batch, config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
    return {"conv": jnp.zeros(conv, dtype), "state": jnp.zeros(state, jnp.float32)}


class Qwen3_5ForCausalLM(TextOfVisionLanguage, LlamaForCausalLM):
    """Qwen3.5's text causal LM: ``model`` (the hybrid decoder) and ``lm_head``."""

    model_class: ClassVar[type[nnx.Module]] = Qwen3_5TextModel

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv`` (the linear
        attention layers have no keys to prefix)."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


class _Qwen3_5WithHead(TextOfVisionLanguage, PreTrainedModel):
    """The decoder under ``model`` and a new task head (a causal LM checkpoint loads without its
    ``lm_head``)."""

    base_model_prefix: ClassVar[str] = "model"
    optional_keys: ClassVar[tuple[str, ...]] = (r"score\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*TextOfVisionLanguage.ignored_keys, r"lm_head\.weight")

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.model = Qwen3_5TextModel(self.config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class Qwen3_5TextForSequenceClassification(TextOfVisionLanguage, LlamaForSequenceClassification):
    """Sequence classification: the decoder plus a ``score`` head read at the last real token (of
    each packed sequence too, as Llama's classifier)."""

    ignored_keys: ClassVar[tuple[str, ...]] = (*TextOfVisionLanguage.ignored_keys, r"lm_head\.weight")
    model_class: ClassVar[type[nnx.Module]] = Qwen3_5TextModel


class Qwen3_5ForTokenClassification(_Qwen3_5WithHead):
    """Token classification: the decoder, dropout and a biased ``score`` on every token."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout_rate = token_classifier_dropout(self.config)
        self.score = nnx.Linear(self.config.hidden_size, self.config.num_labels, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 dropout_rng=None) -> ModelOutput:
        base_rng, head_rng = split_keys(dropout_rng, 2)
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, dropout_rng=base_rng)
        logits = self.score(dropout(out.last_hidden_state, self.dropout_rate, head_rng))
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels),
                           last_hidden_state=out.last_hidden_state)


# ------------------------------------------------------------------------------------------ MoE


class Qwen3_5MoeSparseMoeBlock(Qwen2MoeSparseMoeBlock):
    """Qwen2-MoE's block (routed experts of ``moe_intermediate_size``, a gated shared expert); the
    top-k weights always renormalised (the config has no ``norm_topk_prob``)."""

    @staticmethod
    def renormalises(config) -> bool:
        return True


class Qwen3_5MoeDecoderLayer(Qwen3_5DecoderLayer):
    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return True

    @staticmethod
    def make_mlp(config, layer_idx: int, **kw) -> nnx.Module:
        return Qwen3_5MoeSparseMoeBlock(config, layer_idx, **kw)


class Qwen3_5MoeTextModel(Qwen3_5TextModel):
    layer_class: ClassVar[type[nnx.Module]] = Qwen3_5MoeDecoderLayer


class Qwen3_5MoeForCausalLM(_MoeCheckpoints, Qwen3_5ForCausalLM):
    """Qwen3.5-MoE's text causal LM (``qwen3_5_moe_text``): the hybrid decoder with a mixture of
    experts and a gated shared expert as every layer's MLP; ``aux_loss`` and ``router_logits`` as
    :class:`~peftjax.models.MixtralForCausalLM`'s. The Hub's per-expert layout and transformers 5's
    fused one load; ``save_pretrained`` writes the per-expert one, as transformers does."""

    model_class: ClassVar[type[nnx.Module]] = Qwen3_5MoeTextModel
    expert_layout: ClassVar[ExpertLayout] = QWEN_MOE_EXPERTS

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, output_router_logits: bool | None = None, dropout_rng=None,
                 logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :meth:`Qwen3_5ForCausalLM.__call__`, plus ``aux_loss`` and ``router_logits`` when
        ``output_router_logits`` (default: the config's) asks for them; with ``labels`` the loss
        then includes ``router_aux_loss_coef * aux_loss``."""
        # Mixtral's head on this decoder (the model's call takes the same arguments in that order)
        return MixtralForCausalLM.__call__(self, input_ids, attention_mask, position_ids, labels, inputs_embeds,
                                           cache, cache_index, None, output_router_logits, dropout_rng,
                                           logits_to_keep, segment_ids=segment_ids)


register(Qwen3_5ForCausalLM, model_types=("qwen3_5_text",), default=True)
register(Qwen3_5MoeForCausalLM, model_types=("qwen3_5_moe_text",), default=True)
register(Qwen3_5TextForSequenceClassification)
register(Qwen3_5ForTokenClassification)
