"""Llama 4's text model in Flax NNX (``Llama4ForCausalLM``, ``model_type`` ``"llama4_text"``), under
transformers 5's names.

Against Llama (``_llama``, whose decoder stack and causal LM this reuses), as transformers 5.25's
``modeling_llama4`` computes it:

* RoPE layers and NoPE layers (``no_rope_layers``: 1 where a layer rotates, by default every
  ``no_rope_layer_interval``-th layer does not). RoPE turns adjacent pairs ``(2i, 2i + 1)`` (the
  complex rotation of ``freqs_cis``: GLM's interleaved layout, :func:`~peftjax.models._glm4.rotate_pairs`),
  the ``llama3`` scaling of the releases included; with ``use_qk_norm`` the rotated queries and
  keys of RoPE layers are RMS-normalised over each head without a weight;
* ``layer_types``: ``chunked_attention`` layers (by default the RoPE layers, when
  ``attention_chunk_size`` is set) attend causally within chunks of ``attention_chunk_size``
  tokens counted from each row's first real token (:func:`~peftjax.models._attention.chunked_attention_mask_4d`),
  or in packed rows (``segment_ids``) from each sequence's first token, as each would be alone;
  ``full_attention`` layers causally over everything. The KV cache keeps every token and the mask
  does the chunking, as for sliding windows;
* with ``attn_temperature_tuning`` the NoPE layers scale their queries by
  ``1 + attn_scale * log(1 + floor((n + 1) / floor_scale))`` at cache slot ``n`` (Mistral 4's
  query scale, :func:`~peftjax.models._mistral4.llama4_query_scale_at`; transformers counts the
  slots, padding included, not ``position_ids``; in packed rows each sequence's slots count from 0);
* the MLP (``feed_forward``) of the ``moe_layers`` (by default every ``interleave_moe_layer_step``-th)
  is a mixture of experts: the router (``feed_forward.router``, a bias-free linear) picks the top
  ``num_experts_per_tok`` logits, each chosen expert takes the token *multiplied by* the sigmoid of
  its logit (the others contribute nothing), and a shared expert (``feed_forward.shared_expert``,
  SwiGLU) takes every token; the experts are fused as transformers stores them, input-major:
  ``experts.gate_up_proj [experts, hidden, 2I]`` (``[gate | up]``), ``experts.down_proj
  [experts, I, hidden]``. The other layers' MLP is a SwiGLU of ``intermediate_size_mlp``.

Experts run densely (every token through every expert, zero input outside its top k): the same
sums as transformers', which also runs every expert on every token. There is no load-balancing
loss (transformers' Llama 4 adds none to its loss). A ``Llama4ForConditionalGeneration``
checkpoint (``model_type`` ``"llama4"``) loads its text model: ``language_model.model.*`` and
``language_model.lm_head.*`` read as ``model.*`` and ``lm_head.*``, the vision model and the
projector skipped, as transformers' ``Llama4ForCausalLM.from_pretrained`` reads it.

LoRA: PEFT 0.22.0 keys its default targets by ``model_type``, and has none for ``llama4_text``
(only for the vision-language ``llama4``); the router is an ``nn.Linear`` subclass returning a
pair in transformers, which PEFT's LoRA cannot wrap, so name the linears to adapt
(``q_proj``, ..., ``down_proj`` reach the attention, the shared expert and the dense MLPs). The
experts' 3-D parameters take ``target_parameters``, factored as PEFT factors them (:class:`Llama4TextExperts`).

Refused by name: a ``hidden_act`` other than ``silu``, ``layer_types`` other than the two above,
chunked layers without ``attention_chunk_size``, ``no_rope_layers`` shorter than the layers,
``num_experts_per_tok`` outside ``[1, experts]``, ``expert_dispatch="grouped"`` and
``scan_layers=True`` over layers that differ.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._glm4 import rotate_pairs
from peftjax.models._llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from peftjax.models._mistral4 import llama4_query_scale_at
from peftjax.models._mixtral import check_top_k, expert_count
from peftjax.models._vision_language import TextOfVisionLanguage
from peftjax.nn._functional import swiglu
from peftjax.nn._norm import RMSNorm, rms_norm
from peftjax.nn._param_reader import ParamReader

LAYER_TYPES = ("full_attention", "chunked_attention")
TEMPERATURE = "temperature"  # the NoPE layers' query scale [1 or b, q], beside the masks the layers read


def check_llama4_config(config) -> None:
    """Refuses by name what this implementation does not do (every problem listed)."""
    n, problems = config.num_hidden_layers, []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
    unknown = sorted(set(config.layer_types) - set(LAYER_TYPES))
    if unknown:
        problems.append(f"layer_types {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    if "chunked_attention" in config.layer_types and not config.attention_chunk_size:
        problems.append(f"chunked_attention layers need attention_chunk_size; found {config.attention_chunk_size!r}")
    if len(config.no_rope_layers) < n or len(config.layer_types) < n:
        problems.append(f"no_rope_layers ({len(config.no_rope_layers)}) and layer_types ({len(config.layer_types)}) "
                        f"must cover num_hidden_layers={n}")
    if (getattr(config, "expert_dispatch", None) or "dense") != "dense":
        problems.append(f"expert_dispatch={config.expert_dispatch!r} is not supported; the experts run densely "
                        f"(each takes every token scaled by its score)")
    if problems:
        raise ValueError("Llama 4 text config: " + "; ".join(problems))


class Llama4TextAttention(LlamaAttention):
    """Llama's attention: pairwise RoPE and the weightless q/k norm on RoPE layers, the temperature
    on NoPE layers, its layer type's mask."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.use_rope = bool(config.no_rope_layers[layer_idx])
        self.qk_norm = bool(config.use_qk_norm) and self.use_rope
        self.temperature = bool(config.attn_temperature_tuning) and not self.use_rope
        self.epsilon = float(config.rms_norm_eps)

    @staticmethod
    def mask_key(config, layer_idx: int):
        return config.layer_types[layer_idx]

    def rotate(self, x, cos, sin):
        if not self.use_rope:
            return x
        x = rotate_pairs(x, cos, sin)
        return rms_norm(x, jnp.ones(x.shape[-1:], x.dtype), self.epsilon) if self.qk_norm else x

    def encode_positions(self, q, k, cos, sin, masks):
        q, k = super().encode_positions(q, k, cos, sin, masks)
        if self.temperature:
            q = (q * masks[TEMPERATURE][:, :, None, None]).astype(q.dtype)
        return q, k


class Llama4TextExperts(ParamReader, nnx.Module):
    """``feed_forward.experts``: ``gate_up_proj [experts, hidden, 2I]`` and ``down_proj
    [experts, I, hidden]``, input-major. transformers does not declare them ``is_transposed``, so
    PEFT's ``target_parameters`` LoRA factors each as if it were ``[experts, out, in]``: ``A [E * r,
    last dim]``, ``B [middle dim, r * E]``; so does this class (a low-rank delta either way)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "gate_up_proj": ("gate_up_proj", False), "down_proj": ("down_proj", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, i = expert_count(config), config.hidden_size, config.intermediate_size
        init = nnx.initializers.normal(config.initializer_range)
        self.gate_up_proj = nnx.Param(init(rngs.params(), (e, h, 2 * i), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), param_dtype))
        self.dtype = dtype

    def __call__(self, x):
        """Each expert's own input ``x [tokens, experts, hidden]`` through it -> ``[tokens, experts, hidden]``."""
        gate_up = jnp.einsum("teh,eho->teo", x, self.param_value("gate_up_proj").astype(self.dtype))
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return jnp.einsum("tei,eih->teh", swiglu(gate, up), self.param_value("down_proj").astype(self.dtype))


class Llama4TextMoe(nnx.Module):
    """``feed_forward`` of a MoE layer: ``router``, ``experts`` and ``shared_expert``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_top_k(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.top_k = config.num_experts_per_tok
        self.experts = Llama4TextExperts(config, **kw)
        self.router = nnx.Linear(config.hidden_size, expert_count(config), use_bias=False, **kw)
        self.shared_expert = LlamaMLP(config, **kw)

    def __call__(self, x):
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        logits = self.router(flat)
        _, index = jax.lax.top_k(logits, self.top_k)
        chosen = jnp.any(jax.nn.one_hot(index, logits.shape[-1], dtype=jnp.bool_), axis=-2)
        scores = jnp.where(chosen, jax.nn.sigmoid(logits.astype(jnp.float32)), 0.0).astype(logits.dtype)
        routed = jnp.sum(self.experts(flat[:, None, :] * scores[:, :, None]), axis=1)
        return (self.shared_expert(flat) + routed).reshape(b, s, h)


class Llama4TextDecoderLayer(LlamaDecoderLayer):
    """Pre-norm attention and ``feed_forward`` (the MoE block in ``moe_layers``, else a dense MLP)."""

    attention_class: ClassVar[type[nnx.Module]] = Llama4TextAttention

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.feed_forward = Llama4TextMoe(config, **kw) if layer_idx in config.moe_layers else \
            LlamaMLP(config, intermediate_size=config.intermediate_size_mlp, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, masks, cache, cache_index, prefix, dropout_rng)
        x = x + a
        return x + self.feed_forward(self.post_attention_layernorm(x)), cache


def layer_kinds(config) -> list[tuple[bool, bool, str]]:
    """Each layer's ``(RoPE, MoE, layer type)``."""
    return [(bool(config.no_rope_layers[i]), i in config.moe_layers, config.layer_types[i])
            for i in range(config.num_hidden_layers)]


class Llama4TextModel(LlamaModel):
    """The decoder stack: ``embed_tokens``, ``layers``, ``norm``."""

    layer_class: ClassVar[type[nnx.Module]] = Llama4TextDecoderLayer

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_llama4_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def check_scan(config) -> None:
        kinds = layer_kinds(config)
        if len(set(kinds)) > 1:
            raise ValueError(f"scan_layers=True needs layers alike; found (RoPE, MoE, layer type) {kinds}")

    def attention_masks(self, pos: attn.DecoderPositions, segment_ids=None) -> dict:
        """Each layer type's mask, and the NoPE layers' query scale at the slots (``TEMPERATURE``).
        With ``segment_ids`` (packed rows) each sequence is on its own: attended within, its chunks
        and its slots counted from its first token."""
        config = self.config
        full = attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True)
        masks = {"full_attention": attn.within_segments(full, segment_ids)}
        if "chunked_attention" in config.layer_types:
            masks["chunked_attention"] = attn.chunked_attention_mask_4d(
                pos.query_positions, pos.key_mask, int(config.attention_chunk_size), segment_ids)
        if config.attn_temperature_tuning:  # at [1, q] slots, or [b, q]: each packed sequence's own, from 0
            slots = pos.query_positions[None] if segment_ids is None else attn.segment_positions(segment_ids)
            masks[TEMPERATURE] = llama4_query_scale_at(slots + 1, float(config.attn_scale), float(config.floor_scale))
        return masks


class Llama4ForCausalLM(TextOfVisionLanguage, LlamaForCausalLM):
    """Llama 4's text causal LM: ``model`` (the decoder) and ``lm_head``; reads the text model of a
    ``Llama4ForConditionalGeneration`` checkpoint too."""

    # transformers' Llama4ForConditionalGeneration holds the whole causal LM as language_model
    vision_language_names: ClassVar[dict[str, str]] = {r"^model\.": "language_model.model.",
                                                       r"^lm_head$": "language_model.lm_head"}
    model_class: ClassVar[type[nnx.Module]] = Llama4TextModel


register(Llama4ForCausalLM, model_types=("llama4_text",), default=True)
