"""Gemma 4's text decoder (``model_type`` ``"gemma4_text"``) in Flax NNX, under transformers' names.

What differs from Gemma 3 (``_gemma3``), as transformers 5's ``Gemma4ForCausalLM`` computes it:

- RMSNorm multiplies by ``weight`` itself (starting at one), not ``1 + weight``; values get a norm
  without a weight (``v_norm``); attention scores are not scaled (``scaling = 1``);
- the layers are not alike: the global ones (``full_attention``) have their own head size and, with
  ``attention_k_eq_v``, their own key/value heads (``per_layer_config``, or ``global_head_dim`` and
  ``num_global_key_value_heads``); with ``attention_k_eq_v`` their values are the key projection's
  output (no ``v_proj``); sliding layers rotate with the default RoPE, global ones with the
  *proportional* one (``partial_rotary_factor`` of the frequencies, the rest zero);
- the last ``num_kv_shared_layers`` layers compute no keys and values: each attends over those of
  the last earlier layer of its type (and with ``use_double_wide_mlp`` has a twice wider MLP);
- per-layer embeddings (``hidden_size_per_layer_input``): a second scaled table
  (``embed_tokens_per_layer``) and a projection of the embeddings give each layer a small input,
  gated into the residual stream after the MLP;
- each layer's output is multiplied by its ``layer_scalar`` (a checkpoint buffer in transformers, a
  parameter here so that it loads and saves with the weights);
- optionally (``enable_moe_block``) a mixture of experts beside the MLP: a router on the layer's
  input (norm without weight, ``scale``, softmax, top ``top_k_experts`` renormalised, times
  ``per_expert_scale``) and ``experts.gate_up_proj``/``down_proj`` stored as transformers 5 does,
  run densely (every expert on every token, weighted; ``expert_dispatch="grouped"`` is refused);
  the decoder returns the router logits, and there is no load-balancing loss (transformers has none).

The layers differ, so ``scan_layers=True`` is refused, as are prefix adapters (the layers' key and
value shapes differ; the model's ``__call__`` takes no ``prefix_kv``) and ``inputs_embeds`` without
``input_ids`` where per-layer embeddings need the ids. ``use_bidirectional_attention="all"`` is
refused (``"vision"`` is causal for text). ``Gemma4ForConditionalGeneration`` checkpoints (vision
and audio, the text model under ``model.language_model``) are not read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._gemma2 import GELU_APPROXIMATE, ScaledEmbed, softcapped_lm_output
from peftjax.models._layer_kinds import LAYER_TYPES
from peftjax.models._llama import LlamaForCausalLM, LlamaModel, packed_kwargs
from peftjax.models._modeling import ConfigRef
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import RotaryEmbedding, apply_rotary
from peftjax.models._vision_language import TextOfVisionLanguage
from peftjax.nn._functional import gelu
from peftjax.nn._norm import RMSNorm
from peftjax.nn._param_reader import ParamReader
from peftjax.nn._scan import check_remat, run_layer

SUPPORTED_ROPE_TYPES = ("default", "proportional")
# what per_layer_config may set for a layer
LAYER_OVERRIDES = ("head_dim", "num_key_value_heads")


def kv_sharing_modes(config) -> list[str | None]:
    """Each layer's role in key/value sharing, as ``Gemma4TextConfig.kv_sharing_modes``: ``"reuse"``
    (the last ``num_kv_shared_layers`` layers: no keys of their own), ``"store"`` (the last layer of
    its type before those, whose keys they read) or ``None``.

    Raises:
      ValueError: a layer type among the sharing layers that no earlier layer has.
    """
    n, types = config.num_hidden_layers, list(config.layer_types)
    first = n - int(config.num_kv_shared_layers or 0)
    if first == 0:
        return ["reuse"] * n
    modes: list[str | None] = [None if i < first else "reuse" for i in range(n)]
    missing = sorted(set(types) - set(types[:first]))
    if missing:
        raise ValueError(f"{config.model_type}: num_kv_shared_layers={config.num_kv_shared_layers} leaves "
                         f"{missing} layers without an earlier layer of their type to share keys with")
    for t in set(types):
        modes[max(i for i in range(first) if types[i] == t)] = "store"
    return modes


def layer_layouts(config) -> list[tuple[int, int]]:
    """Each layer's ``(key/value heads, head size)``: the config's, as ``per_layer_config`` overrides it.

    Reads transformers' per-layer view (whose global ``head_dim`` is not readable when layers differ)
    and :class:`~peftjax.models.ModelConfig`'s ``{layer index: overrides}`` table alike.
    """
    table = getattr(config, "per_layer_config", None)
    if table is not None and not isinstance(table, Mapping):  # transformers' per-layer view
        return [(c.num_key_value_heads, c.head_dim) for c in table]
    table = {int(i): layer for i, layer in (table or {}).items()}
    return [(table.get(i, {}).get("num_key_value_heads", config.num_key_value_heads),
             table.get(i, {}).get("head_dim", config.head_dim)) for i in range(config.num_hidden_layers)]


def check_gemma4_config(config) -> None:
    """Refuses what this implementation does not do, naming the option.

    Raises:
      ValueError: ``use_bidirectional_attention="all"``, an unknown ``hidden_activation``, layer type
        or RoPE type, ``per_layer_config`` overrides other than head sizes and key/value heads,
        every layer sharing keys, a mixture of experts without its sizes, ``scan_layers=True`` or an
        ``expert_dispatch`` other than ``"dense"``.
    """
    name = config.model_type
    if getattr(config, "use_bidirectional_attention", None) == "all":
        raise ValueError(f"{name}: use_bidirectional_attention='all' is not supported (only causal attention)")
    if config.hidden_activation not in GELU_APPROXIMATE:
        raise ValueError(f"{name}: hidden_activation {config.hidden_activation!r} is not supported; supported: "
                         f"{sorted(GELU_APPROXIMATE)}")
    types = list(config.layer_types)
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"{name}: layer_types {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    if len(types) != config.num_hidden_layers:
        raise ValueError(f"{name}: layer_types has {len(types)} entries for num_hidden_layers="
                         f"{config.num_hidden_layers}")
    table = getattr(config, "per_layer_config", None)
    if isinstance(table, Mapping):
        extra = sorted({k for layer in table.values() for k in layer} - set(LAYER_OVERRIDES))
        if extra:
            raise ValueError(f"{name}: per_layer_config overrides {extra} are not supported; supported: "
                             f"{list(LAYER_OVERRIDES)}")
    for t in set(types):
        kind = rope_parameters_of(config, t).get("rope_type", "default")
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{name}: rope_parameters[{t!r}] rope_type {kind!r} is not supported; supported: "
                             f"{list(SUPPORTED_ROPE_TYPES)}")
    shared = int(config.num_kv_shared_layers or 0)
    if not 0 <= shared < config.num_hidden_layers:
        raise ValueError(f"{name}: num_kv_shared_layers={shared} must leave a layer with its own keys "
                         f"(num_hidden_layers={config.num_hidden_layers})")
    kv_sharing_modes(config)
    if config.enable_moe_block:
        missing = [k for k in ("num_experts", "top_k_experts", "moe_intermediate_size") if not getattr(config, k)]
        if missing:
            raise ValueError(f"{name}: enable_moe_block=True needs {missing}")
    if getattr(config, "scan_layers", False):
        raise ValueError(f"{name}: scan_layers=True is not supported (the layers' shapes differ)")
    if (getattr(config, "expert_dispatch", None) or "dense") != "dense":
        raise ValueError(f"{name}: expert_dispatch={config.expert_dispatch!r} is not supported; the experts run "
                         f"densely ('dense')")


def rope_parameters_of(config, layer_type: str) -> dict:
    """``rope_parameters[layer_type]`` (transformers 5 keys Gemma 4's by layer type).

    Raises:
      ValueError: ``rope_parameters`` not keyed by layer type.
    """
    given = config.rope_parameters
    if not isinstance(given, Mapping) or not set(given) <= set(LAYER_TYPES):
        raise ValueError(f"{config.model_type}: rope_parameters must map layer types {list(LAYER_TYPES)} to RoPE "
                         f"settings; found {given!r}")
    return dict(given.get(layer_type) or {"rope_type": "default", "rope_theta": 10000.0})


def gemma4_rotary(config, layer_type: str, head_dim: int) -> RotaryEmbedding:
    """The RoPE of layers of ``layer_type``: the default one over the whole head, or the proportional
    one (transformers' ``_compute_proportional_rope_parameters``): the first
    ``partial_rotary_factor * head_dim // 2`` frequencies of the whole head's, the others zero
    (those dimensions pass unrotated), all divided by ``factor``."""
    p = rope_parameters_of(config, layer_type)
    theta = float(p["rope_theta"])
    if p.get("rope_type", "default") == "default":
        angles, factor = head_dim // 2, 1.0
    else:
        angles, factor = int(p.get("partial_rotary_factor", 1.0) * head_dim // 2), float(p.get("factor", 1.0))
    rotated = 1.0 / (theta ** (np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = np.concatenate([rotated, np.zeros(head_dim // 2 - angles, np.float32)]).astype(np.float32) / factor
    return RotaryEmbedding(tuple(inv.astype(np.float32).tolist()))


def unit_rms(x: jax.Array, epsilon: float) -> jax.Array:
    """RMSNorm without a weight (``with_scale=False``), in float32, cast back to ``x``'s dtype."""
    h = x.astype(jnp.float32)
    return (h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + epsilon)).astype(x.dtype)


def per_layer_inputs(model, input_ids, x, table_rows: int | None = None) -> jax.Array:
    """``[b, s, layers, hidden_size_per_layer_input]`` of ``model`` (Gemma 4's decoder or Gemma 3n's):
    the projected embeddings ``x`` (normed) plus the per-layer table's rows, over ``sqrt(2)``; with
    ``table_rows``, ids beyond the table read its row 0 (Gemma 3n's)."""
    b, s, _ = x.shape
    n, p = len(model.layers), model.per_layer_size
    projected = model.per_layer_model_projection(x) * jnp.asarray(x.shape[-1] ** -0.5, x.dtype)
    projected = model.per_layer_projection_norm(projected.reshape(b, s, n, p))
    if table_rows is not None:
        input_ids = jnp.where((input_ids >= 0) & (input_ids < table_rows), input_ids, 0)
    own = model.embed_tokens_per_layer(input_ids).reshape(b, s, n, p)
    return (projected + own) * jnp.asarray(2.0**-0.5, x.dtype)


def inputs_by_layer_type(ropes, sliding_window, pos, dtype, segment_ids) -> dict[str, tuple]:
    """``{layer type: (cos, sin, mask)}`` for one call: each type's RoPE at ``pos``'s positions, the
    sliding type's mask windowed; packed rows (``segment_ids``) attend within each sequence."""
    out = {}
    for t, rope in ropes:
        window = sliding_window if t == "sliding_attention" else None
        cos, sin = rope.cos_sin(pos.position_ids, dtype)
        mask = attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True, window=window)
        out[t] = (cos, sin, attn.within_segments(mask, segment_ids))
    return out


def embeddings_with_ids(model, input_ids, inputs_embeds) -> jax.Array:
    """``inputs_embeds``, or the lookup of ``input_ids``; a decoder with per-layer embeddings
    (``model.per_layer_size``) needs the ids beside given embeddings, in their shape.

    Raises:
      ValueError: per-layer embeddings without ``input_ids``, or ids of another shape than the
        embeddings' ``[batch, seq]``.
    """
    owner = type(model).__name__
    if model.per_layer_size and input_ids is None:
        raise ValueError(f"{owner}: the per-layer embeddings (hidden_size_per_layer_input) need input_ids beside "
                         f"inputs_embeds")
    x = model.embed_tokens(jnp.asarray(input_ids)) if inputs_embeds is None else jnp.asarray(inputs_embeds)
    b, s, _ = x.shape
    if model.per_layer_size and tuple(jnp.shape(input_ids)) != (b, s):
        raise ValueError(f"{owner}: input_ids {tuple(jnp.shape(input_ids))} must match inputs_embeds {(b, s)} (the "
                         f"per-layer embeddings look the ids up)")
    return x


def run_sharing_layers(model, h, per_type, per_layer, cache, start, offset, dropout_rng):
    """Runs ``model.layers`` in order (Gemma 4's and Gemma 3n's): a layer of type ``t`` gets that
    type's ``(cos, sin, mask)``, its per-layer input (``per_layer[:, :, i]``), its cache, and where
    it reuses keys (``model.modes``) those of the last layer of its type that stored them. Each
    layer returns ``(h, cache, (keys, values), *extras)``.

    Returns ``(h, the new cache or None, each layer's extras)``.
    """
    new_cache = [] if cache is not None else None
    shared, extras = {}, []
    remat = model.remat if cache is None else "none"  # remat in training and scoring only
    for i, t in enumerate(model.layer_types):
        reuse = model.modes[i] == "reuse"
        layer_input = None if per_layer is None else per_layer[:, :, i]
        layer_cache = None if cache is None or reuse else cache[i]
        shared_kv = shared.get(t) if reuse else None

        def run(layer, x, key, t=t, layer_input=layer_input, shared_kv=shared_kv, layer_cache=layer_cache):
            return layer(x, *per_type[t], layer_input, shared_kv, layer_cache, start, offset, key)

        h, layer_cache, kv, *rest = run_layer(model.layers, i, run, h, remat, dropout_rng)
        if model.modes[i] == "store":
            shared[t] = kv
        if new_cache is not None:
            new_cache.append(layer_cache if layer_cache is not None else {})
        extras.append(rest)
    return h, new_cache, extras


def _gelu(x: jax.Array, approximate: bool) -> jax.Array:
    return jax.nn.gelu(x, approximate=True) if approximate else gelu(x)


class Gemma4TextAttention(nnx.Module):
    """q/k norms before RoPE, a weightless v norm, unscaled scores; a key/value sharing layer has
    ``q_proj``, ``q_norm`` and ``o_proj`` only."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_type = config.layer_types[layer_idx]
        self.num_heads = config.num_attention_heads
        self.num_kv_heads, self.head_dim = layer_layouts(config)[layer_idx]
        self.shares_kv = kv_sharing_modes(config)[layer_idx] == "reuse"
        k_eq_v = bool(getattr(config, "attention_k_eq_v", False))  # Gemma 3n's config has no such field
        self.values_are_keys = k_eq_v and self.layer_type != "sliding_attention"
        self.epsilon = float(config.rms_norm_eps)
        self.dropout_rate = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        h, d, bias = config.hidden_size, self.head_dim, bool(config.attention_bias)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(h, self.num_heads * d, use_bias=bias, **kw)
        self.q_norm = RMSNorm(d, epsilon=self.epsilon, **kw)
        if not self.shares_kv:
            self.k_norm = RMSNorm(d, epsilon=self.epsilon, **kw)
            self.k_proj = nnx.Linear(h, self.num_kv_heads * d, use_bias=bias, **kw)
            if not self.values_are_keys:
                self.v_proj = nnx.Linear(h, self.num_kv_heads * d, use_bias=bias, **kw)
        self.o_proj = nnx.Linear(self.num_heads * d, h, use_bias=bias, **kw)

    def __call__(self, x, cos, sin, mask, shared_kv=None, cache=None, cache_index=None, causal_offset=None,
                 dropout_rng=None):
        """Returns ``(output, new cache, (keys, values))``: the keys and values it attended over (what
        a later layer sharing them reads)."""
        b, s, _ = x.shape
        q = apply_rotary(self.q_norm(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)), cos, sin)
        if self.shares_kv:
            k, v = shared_kv
        else:
            k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
            v = k if self.values_are_keys else self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
            k, v = apply_rotary(self.k_norm(k), cos, sin), unit_rms(v, self.epsilon)
            if cache is not None:
                cache = attn.update_kv_cache(cache, k, v, cache_index)
                k, v = cache["k"], cache["v"]
        out = attn.dot_product_attention(q, k, v, mask, scale=1.0, dropout_rate=self.dropout_rate,
                                         dropout_rng=dropout_rng, causal_offset=causal_offset)
        return self.o_proj(out.reshape(b, s, -1)), cache, (k, v)


class Gemma4TextMLP(nnx.Module):
    """GeGLU: ``down_proj(gelu(gate_proj(x)) * up_proj(x))``, no biases."""

    def __init__(self, config, intermediate_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h = config.hidden_size
        self.gate_proj = nnx.Linear(h, intermediate_size, **kw)
        self.up_proj = nnx.Linear(h, intermediate_size, **kw)
        self.down_proj = nnx.Linear(intermediate_size, h, **kw)
        self.approximate = GELU_APPROXIMATE[config.hidden_activation]

    def __call__(self, x):
        return self.down_proj(_gelu(self.gate_proj(x), self.approximate) * self.up_proj(x))


class Gemma4TextRouter(ParamReader, nnx.Module):
    """``router``: ``proj`` (an ``nnx.Linear``), ``scale [hidden]`` and ``per_expert_scale [experts]``."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "scale": ("scale", False), "per_expert_scale": ("per_expert_scale", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, e = config.hidden_size, config.num_experts
        self.proj = nnx.Linear(h, e, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale = nnx.Param(jnp.ones((h,), param_dtype))
        self.per_expert_scale = nnx.Param(jnp.ones((e,), param_dtype))
        self.top_k, self.epsilon, self.root = int(config.top_k_experts), float(config.rms_norm_eps), h**-0.5

    def __call__(self, x):
        """``(weights [tokens, top_k], experts [tokens, top_k], router logits [tokens, experts])``."""
        h = unit_rms(x, self.epsilon) * self.param_value("scale").astype(x.dtype)[None, :] * self.root
        logits = self.proj(h)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        top, index = jax.lax.top_k(probs, self.top_k)
        top = top / jnp.sum(top, axis=-1, keepdims=True)
        return top * self.param_value("per_expert_scale").astype(jnp.float32)[index], index, logits


class Gemma4TextExperts(ParamReader, nnx.Module):
    """``experts``: ``gate_up_proj [experts, 2I, hidden]`` and ``down_proj [experts, hidden, I]``
    (transformers 5's layout; LoRA reaches them through ``target_parameters``), GeGLU each."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "gate_up_proj": ("gate_up_proj", False), "down_proj": ("down_proj", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        init = nnx.initializers.normal(config.initializer_range)
        self.gate_up_proj = nnx.Param(init(rngs.params(), (e, 2 * i, h), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, h, i), param_dtype))
        self.dtype = dtype
        self.approximate = GELU_APPROXIMATE[config.hidden_activation]

    def __call__(self, x, top, index):
        """``x [tokens, hidden]`` through every expert, summed with each token's top-k weights."""
        weights = jnp.sum(jax.nn.one_hot(index, self.gate_up_proj.shape[0], dtype=jnp.float32) * top[..., None],
                          axis=-2)
        gate_up = jnp.einsum("th,eoh->teo", x, self.param_value("gate_up_proj").astype(self.dtype))
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out = jnp.einsum("tei,ehi->teh", _gelu(gate, self.approximate) * up,
                         self.param_value("down_proj").astype(self.dtype))
        return jnp.einsum("teh,te->th", out, weights.astype(out.dtype))


class Gemma4TextDecoderLayer(nnx.Module):
    """Norms before and after attention and the MLP (and the experts beside it), the per-layer
    input's gate, and ``layer_scalar``."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"layer_scalar": ("layer_scalar", False)}

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4TextAttention(config, layer_idx, **kw)
        wide = bool(config.use_double_wide_mlp) and self.self_attn.shares_kv
        self.mlp = Gemma4TextMLP(config, config.intermediate_size * (2 if wide else 1), **kw)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(h, epsilon=eps, **kw))
        self.layer_scalar = nnx.Param(jnp.ones((1,), param_dtype))
        self.per_layer_size = int(config.hidden_size_per_layer_input or 0)
        self.approximate = GELU_APPROXIMATE[config.hidden_activation]
        if self.per_layer_size:
            self.per_layer_input_gate = nnx.Linear(h, self.per_layer_size, use_bias=False, **kw)
            self.per_layer_projection = nnx.Linear(self.per_layer_size, h, use_bias=False, **kw)
            self.post_per_layer_input_norm = RMSNorm(h, epsilon=eps, **kw)
        self.moe = bool(config.enable_moe_block)
        if self.moe:
            self.router = Gemma4TextRouter(config, **kw)
            self.experts = Gemma4TextExperts(config, **kw)
            for name in ("post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                         "pre_feedforward_layernorm_2"):
                setattr(self, name, RMSNorm(h, epsilon=eps, **kw))

    def __call__(self, x, cos, sin, mask, per_layer_input=None, shared_kv=None, cache=None, cache_index=None,
                 causal_offset=None, dropout_rng=None):
        """Returns ``(x, new cache, (keys, values), router logits or None)``."""
        a, cache, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, shared_kv, cache, cache_index,
                                      causal_offset, dropout_rng)
        x = x + self.post_attention_layernorm(a)
        m = self.mlp(self.pre_feedforward_layernorm(x))
        logits = None
        if self.moe:
            b, s, h = x.shape
            flat = x.reshape(b * s, h)
            top, index, logits = self.router(flat)
            experts = self.experts(self.pre_feedforward_layernorm_2(flat), top, index).reshape(b, s, h)
            m = self.post_feedforward_layernorm_1(m) + self.post_feedforward_layernorm_2(experts)
        x = x + self.post_feedforward_layernorm(m)
        if self.per_layer_size:
            g = _gelu(self.per_layer_input_gate(x), self.approximate) * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar.get_value().astype(x.dtype).reshape(()), cache, kv, logits


class Gemma4TextModel(nnx.Module):
    """The decoder stack: ``embed_tokens`` (scaled), the per-layer embeddings, ``layers``, ``norm``."""

    # packed rows (segment_ids) as LlamaModel's: each token's per-layer input is its own, and a
    # layer sharing another's keys and values shares its mask too
    packs_sequences: ClassVar[bool] = True
    packed_inputs = LlamaModel.packed_inputs

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_gemma4_config(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = ConfigRef(config)
        self.remat = check_remat(getattr(config, "remat", "none"))
        h, n = config.hidden_size, config.num_hidden_layers
        self.embed_tokens = ScaledEmbed(config.vocab_size, h, embed_scale=math.sqrt(h), **kw)
        self.per_layer_size = p = int(config.hidden_size_per_layer_input or 0)
        if p:
            self.embed_tokens_per_layer = ScaledEmbed(config.vocab_size_per_layer_input, n * p,
                                                      embed_scale=math.sqrt(p), **kw)
            self.per_layer_model_projection = nnx.Linear(h, n * p, use_bias=False, **kw)
            self.per_layer_projection_norm = RMSNorm(p, epsilon=config.rms_norm_eps, **kw)
        self.layers = nnx.List([Gemma4TextDecoderLayer(config, i, **kw) for i in range(n)])
        self.norm = RMSNorm(h, epsilon=config.rms_norm_eps, **kw)
        # static data: each layer type's RoPE (over that type's head size) and window
        layouts = layer_layouts(config)
        self.layer_types = tuple(config.layer_types)
        self.modes = tuple(kv_sharing_modes(config))
        self.ropes = tuple((t, gemma4_rotary(config, t, layouts[self.layer_types.index(t)][1]))
                           for t in sorted(set(self.layer_types)))
        self.sliding_window = config.sliding_window

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """Runs the decoder; ``dropout_rng``: a key to apply ``attention_dropout`` (training);
        ``segment_ids``: packed rows, as :meth:`LlamaModel.__call__`'s."""
        segment_ids, attention_mask, position_ids = self.packed_inputs(segment_ids, attention_mask, position_ids,
                                                                       cache, None)
        x = embeddings_with_ids(self, input_ids, inputs_embeds)
        b, s, _ = x.shape
        per_layer = per_layer_inputs(self, jnp.asarray(input_ids), x) if self.per_layer_size else None
        pos = attn.decoder_positions(b, s, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                     cache_index=cache_index, prefix_kv=None, num_layers=len(self.layers),
                                     owner=type(self).__name__, prefix_layout=lambda: (0, 0))
        per_type = inputs_by_layer_type(self.ropes, self.sliding_window, pos, x.dtype, segment_ids)
        offset = attn.causal_offset(cache, None, pos.start)
        x, new_cache, extras = run_sharing_layers(self, x, per_type, per_layer, cache, pos.start, offset,
                                                  dropout_rng)
        router_logits = [logits for (logits,) in extras if logits is not None]
        return ModelOutput(last_hidden_state=self.norm(x), past_key_values=new_cache,
                           router_logits=tuple(router_logits) or None)


class Gemma4ForCausalLM(TextOfVisionLanguage, LlamaForCausalLM):
    """Gemma 4 text: the decoder above, a tied LM head by default, ``final_logit_softcapping``."""

    ignored_keys: ClassVar[tuple[str, ...]] = (
        *TextOfVisionLanguage.ignored_keys,
        # transformers' _keys_to_ignore_on_load_unexpected: what the key/value sharing layers lack
        r"model\.(language_model\.)?layers\.\d+\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight",
    )
    model_class: ClassVar[type[nnx.Module]] = Gemma4TextModel

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM` (packed rows too; no ``prefix_kv``), logits
        soft-capped."""
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, dropout_rng,
                         **packed_kwargs(self, segment_ids))
        return softcapped_lm_output(self, out, labels, logits_to_keep)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """One ``{"k", "v"}`` per layer in that layer's shape; ``{}`` for a layer sharing keys."""
        dtype = dtype or self.dtype
        modes = kv_sharing_modes(self.config)
        return [{} if mode == "reuse" else attn.init_kv_cache(1, batch, max_len, kv, d, dtype)[0]
                for mode, (kv, d) in zip(modes, layer_layouts(self.config))]


register(Gemma4ForCausalLM, model_types=("gemma4_text",), default=True)
