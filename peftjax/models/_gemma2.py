"""Gemma 2 in Flax NNX: what differs from the Llama decoder, under transformers' module names.

- ``embed_tokens`` scales its output by ``sqrt(hidden_size)``, rounded to the embedding's dtype
  (transformers' ``Gemma2TextScaledWordEmbedding``); the tied ``lm_head`` reads the table unscaled;
- RMSNorm multiplies by ``1 + weight`` and computes in float32 (the weights start at zero);
- every layer normalises before *and after* attention and the MLP (four norms);
- attention scales by ``query_pre_attn_scalar ** -0.5`` and soft-caps its logits
  (``attn_logit_softcapping``), the LM head soft-caps the logits (``final_logit_softcapping``);
- ``layer_types`` alternates sliding-window and global layers; the MLP is GeGLU
  (``hidden_activation``, tanh-approximated GELU by default).

The layers differ only in their mask (and, in Gemma 3, their RoPE), which the decoder picks
per layer, so ``scan_layers=True`` stacks them all: the scanned step selects layer ``i``'s mask
and RoPE from the stacked per-type tables.

VaultGemma (``model_type`` ``"vaultgemma"``) is Gemma 2 without the norms after attention and the
MLP (:class:`VaultGemmaDecoderLayer`); transformers has only its causal LM.
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._layer_kinds import LAYER_TYPES, LayerKindsModel, kinds_by_type
from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    head_dim_of,
    packed_kwargs,
)
from peftjax.models._losses import causal_lm_head_loss, causal_lm_loss
from peftjax.models._outputs import ModelOutput, kept_positions
from peftjax.models._rope import RotaryEmbedding, apply_rotary, rotary_embedding
from peftjax.nn._functional import gelu

# transformers' ACT2FN names of the GELUs a Gemma MLP may use: tanh approximation or exact
GELU_APPROXIMATE = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}


def check_gemma_config(config) -> None:
    """Refuses what this implementation does not do, naming the option.

    Raises:
      ValueError: ``use_bidirectional_attention``, an unknown ``hidden_activation`` or layer type.
    """
    if getattr(config, "use_bidirectional_attention", None):
        raise ValueError(f"{config.model_type}: use_bidirectional_attention=True is not supported (only causal "
                         f"attention is implemented)")
    act = activation(config)
    if act not in GELU_APPROXIMATE:
        field = "hidden_activation" if getattr(config, "hidden_activation", None) else "hidden_act"
        raise ValueError(f"{config.model_type}: {field} {act!r} is not supported; supported: "
                         f"{sorted(GELU_APPROXIMATE)}")
    unknown = sorted(set(layer_types(config)) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"{config.model_type}: layer_types {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    if len(layer_types(config)) != config.num_hidden_layers:
        raise ValueError(f"{config.model_type}: layer_types has {len(layer_types(config))} entries for "
                         f"num_hidden_layers={config.num_hidden_layers}")


def activation(config) -> str:
    """The MLP's activation: Gemma 2/3's ``hidden_activation``, Gemma's ``hidden_act``."""
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or "gelu_pytorch_tanh"


def layer_types(config) -> tuple[str, ...]:
    """Each layer's attention type (``"sliding_attention"`` or ``"full_attention"``)."""
    types = getattr(config, "layer_types", None)
    if types is None:  # as Gemma2Config derives them: every other layer slides, the first one first
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(config.num_hidden_layers)]
    return tuple(types)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (``x`` itself when ``cap`` is unset)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def softcapped_lm_output(model, out: ModelOutput, labels, logits_to_keep) -> ModelOutput:
    """A Gemma causal LM's output from its decoder's ``out``: the LM head (``lm_head``, else the tied
    embedding) on the kept positions, soft-capped by ``final_logit_softcapping``, and the loss."""
    h = out.last_hidden_state
    head_in = kept_positions(h, logits_to_keep, labels)
    logits = model.model.embed_tokens.attend(head_in) if model.lm_head is None else model.lm_head(head_in)
    cap = getattr(model.config, "final_logit_softcapping", None)
    logits = softcap(logits, cap)
    loss = None
    if labels is not None:
        labels = jnp.asarray(labels)
        # the fused loss projects the hidden states itself, without the cap: only uncapped heads use it
        loss = (causal_lm_loss(logits, labels) if cap is not None
                else causal_lm_head_loss(h, logits, labels, model.lm_head, model.model.embed_tokens))
    return ModelOutput(logits=logits, loss=loss, last_hidden_state=h, past_key_values=out.past_key_values)


class ScaledEmbed(nnx.Embed):
    """``nnx.Embed`` whose lookups are multiplied by ``embed_scale`` (rounded to the table's dtype);
    ``attend`` (the tied LM head) uses the table as it is."""

    def __init__(self, num_embeddings: int, features: int, *, embed_scale: float, **kwargs):
        super().__init__(num_embeddings, features, **kwargs)
        self.embed_scale = float(embed_scale)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        out = super().__call__(inputs)
        scale = jnp.asarray(self.embed_scale, self.embedding.get_value().dtype)
        return out * scale.astype(out.dtype)


class GemmaRMSNorm(nnx.RMSNorm):
    """RMSNorm times ``1 + scale``, in float32, cast back to the input's dtype; ``scale`` starts at 0."""

    def __init__(self, num_features: int, *, epsilon: float, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                         scale_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x: jax.Array, mask=None) -> jax.Array:
        del mask
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.epsilon)
        w = 1.0 + self.scale.get_value().astype(jnp.float32)
        return (h * w.reshape((1,) * (h.ndim - 1) + w.shape)).astype(x.dtype)


class GemmaMLP(nnx.Module):
    """GeGLU: ``down_proj(gelu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nnx.Linear(h, i, **kw)
        self.up_proj = nnx.Linear(h, i, **kw)
        self.down_proj = nnx.Linear(i, h, **kw)
        self.approximate = GELU_APPROXIMATE[activation(config)]

    def __call__(self, x):
        gate = self.gate_proj(x)
        act = jax.nn.gelu(gate, approximate=True) if self.approximate else gelu(gate)
        return self.down_proj(act * self.up_proj(x))


class Gemma2Attention(LlamaAttention):
    """Llama's projections (``attention_bias`` on all four); the mask comes chosen for the layer."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, 0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window = None  # the decoder passes each layer its own mask
        self.scale = float(config.query_pre_attn_scalar) ** -0.5
        self.softcap = self.logit_softcap(config)

    @staticmethod
    def logit_softcap(config) -> float | None:
        return getattr(config, "attn_logit_softcapping", None)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            cache = attn.update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]
        if prefix is not None:  # prefix keys are cached keys: no RoPE
            k, v = attn.prepend_prefix(k, prefix[0]), attn.prepend_prefix(v, prefix[1])
        out = attn.dot_product_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap,
                                         dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
                                         causal_offset=attn.causal_offset(cache, prefix, cache_index))
        return self.o_proj(out.reshape(b, s, -1)), cache


class Gemma2DecoderLayer(nnx.Module):
    """Norms before and after both attention and the MLP."""

    attention_class: ClassVar[type[nnx.Module]] = Gemma2Attention

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.mlp = GemmaMLP(config, **kw)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw))

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's key for ``attention_dropout`` (training); ``None``: none."""
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, prefix, dropout_rng)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), cache


class GemmaEmbeddingAndNorm:
    """Every Gemma's ``embed_tokens`` (scaled) and final ``norm`` (``1 + weight``), for the decoders
    :class:`~peftjax.models.LlamaModel` builds."""

    @staticmethod
    def make_embedding(config, **kw) -> nnx.Embed:
        return ScaledEmbed(config.vocab_size, config.hidden_size, embed_scale=math.sqrt(config.hidden_size), **kw)

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        return GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)


class Gemma2Model(GemmaEmbeddingAndNorm, LayerKindsModel):
    """The decoder stack: ``embed_tokens`` (scaled), ``layers``, ``norm``; each layer takes its
    type's window (and, in Gemma 3, its RoPE)."""

    layer_class: ClassVar[type[nnx.Module]] = Gemma2DecoderLayer
    layer_call = None  # Gemma's layers take their mask as it is

    def layer_kinds_of(self, config):
        check_gemma_config(config)
        types = layer_types(config)
        return types, kinds_by_type(types, lambda t: self.rotary_for(config, t), config.sliding_window)

    @staticmethod
    def rotary_for(config, layer_type: str) -> RotaryEmbedding:
        """The RoPE of layers of ``layer_type`` (Gemma 2: the same for all)."""
        return rotary_embedding(config, head_dim_of(config))


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2: the decoder above, a tied LM head by default, soft-capped logits."""

    model_class: ClassVar[type[nnx.Module]] = Gemma2Model

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        inputs_embeds=None,
        cache=None,
        cache_index=None,
        prefix_kv=None,
        dropout_rng=None,
        logits_to_keep=0,
        segment_ids=None,
    ) -> ModelOutput:
        """As ``LlamaForCausalLM``'s (packed rows too), the logits soft-capped."""
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                         dropout_rng, **packed_kwargs(self, segment_ids))
        return softcapped_lm_output(self, out, labels, logits_to_keep)


class Gemma2ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Gemma2Model


class Gemma2ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Gemma2Model


class VaultGemmaDecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's layer without the norms after attention and the MLP (``input_layernorm`` and
    ``pre_feedforward_layernorm`` only), as transformers' ``VaultGemmaDecoderLayer``."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.mlp = GemmaMLP(config, **kw)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index, prefix, dropout_rng)
        x = x + a
        return x + self.mlp(self.pre_feedforward_layernorm(x)), cache


class VaultGemmaModel(Gemma2Model):
    layer_class: ClassVar[type[nnx.Module]] = VaultGemmaDecoderLayer


class VaultGemmaForCausalLM(Gemma2ForCausalLM):
    """VaultGemma (Google's differentially private VaultGemma 1B): Gemma 2 with two norms a layer."""

    model_class: ClassVar[type[nnx.Module]] = VaultGemmaModel


register(Gemma2ForCausalLM, model_types=("gemma2",), default=True)
register(VaultGemmaForCausalLM, model_types=("vaultgemma",), default=True)
register(Gemma2ForSequenceClassification)
register(Gemma2ForTokenClassification)
