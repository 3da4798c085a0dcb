"""DeepSeek-V3 in Flax NNX: multi-head latent attention and a sigmoid-routed mixture of experts,
under transformers' names (``DeepseekV3ForCausalLM`` of transformers 5).

Against Llama (``_llama``) and Mixtral (``_mixtral``, whose fused experts and checkpoint layouts
this reuses):

* **Multi-head latent attention** (``self_attn``). Queries come from ``q_a_proj`` (to
  ``q_lora_rank``), ``q_a_layernorm`` and ``q_b_proj``, or from one ``q_proj`` when
  ``q_lora_rank`` is ``None``. Keys and values come from one latent: ``kv_a_proj_with_mqa`` gives
  ``kv_lora_rank`` + ``qk_rope_head_dim`` features; the first part goes through
  ``kv_a_layernorm`` and ``kv_b_proj`` to each head's ``qk_nope_head_dim`` key and
  ``v_head_dim`` value features, the second is one rotary key shared by all heads. A head's query
  and key are ``[nope | rope]`` (``qk_nope_head_dim + qk_rope_head_dim`` wide); only the rope part
  turns, with ``rope_interleave`` (the default) on adjacent pairs of dimensions, otherwise on
  halves. ``attention_bias`` puts biases on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj``.
  The score scale is ``qk_head_dim ** -0.5``, times ``mscale ** 2`` for a scaled RoPE with
  ``mscale_all_dim`` (YaRN's, as transformers' ``yarn_apply_mscale``). The KV cache holds the
  latent and the rotary key, as transformers' does (``kv_lora_rank + qk_rope_head_dim`` numbers a
  token and layer); each step expands every cached slot through ``kv_b_proj``.
* **MLP**: the first ``first_k_dense_replace`` layers are dense (Llama's MLP, ``intermediate_size``);
  the others hold a mixture of experts (``mlp``): ``n_routed_experts`` routed experts fused as
  transformers 5 holds them (``mlp.experts.gate_up_proj``, ``down_proj``, each
  ``moe_intermediate_size`` wide) plus ``mlp.shared_experts``, one MLP of ``n_shared_experts *
  moe_intermediate_size`` every token goes through.
* **Routing** (``mlp.gate``: ``weight [experts, hidden]`` and ``e_score_correction_bias
  [experts]``, both float32 as transformers keeps them): a token's scores are
  ``sigmoid(router logits)``; experts are *chosen* by score + bias, within the ``topk_group`` of
  ``n_group`` expert groups whose two best biased scores sum highest ("noaux_tc"); the chosen
  experts are *weighted* by their unbiased scores, renormalised to sum to one with
  ``norm_topk_prob``, times ``routed_scaling_factor``. There is no load-balancing loss (transformers
  computes none either). ``e_score_correction_bias`` is a base weight here (an ``nnx.Param``, frozen
  under an adapter like the others; a transformers buffer).

Checkpoints: the Hub's per-expert layout (``mlp.experts.N.gate_proj/up_proj/down_proj``) and
transformers 5's fused one both load; ``save_pretrained`` writes the per-expert one, as
transformers does. LoRA: PEFT 0.22 converts DeepSeek-V3's targets with its ``qwen2_moe`` pattern
(``gate_proj``/``up_proj``/``down_proj`` and ``gate`` add ``target_parameters`` on the experts and
router, and stay LoRA targets on the dense layers' and shared experts' MLPs: 0.21.2 moved them to
the experts), and so does peftjax; PEFT has no default targets for it. Prefix tuning is refused (the models take no
``prefix_kv``): PEFT cannot run it on transformers 5's latent cache either.

Refused by name: ``topk_method`` other than ``"noaux_tc"``, ``scoring_func`` other than
``"sigmoid"``, ``hidden_act`` other than ``silu``, ``num_key_value_heads`` other than
``num_attention_heads``, a ``head_dim`` other than ``qk_rope_head_dim``, expert groups that do not
divide the experts or hold fewer than two, a top k larger than the chosen groups hold, RoPE types
peftjax does not compute, and ``scan_layers=True`` over dense and sparse layers mixed.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaMLP,
    LlamaModel,
)
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralExperts,
    _MoeCheckpoints,
    expert_count,
    expert_dispatch,
    top_k_by_choice,
)
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import apply_rotary, rope_parameters
from peftjax.nn._dropout import layer_key, split_keys
from peftjax.nn._norm import RMSNorm
from peftjax.nn._param_reader import ParamReader
from peftjax.nn._scan import run_layers

DEEPSEEK_EXPERTS = ExpertLayout("DeepSeek-V3", "mlp", gate="gate_proj", up="up_proj", down="down_proj")


def check_deepseek_config(config) -> None:
    """Refuses by name what transformers' DeepSeek-V3 does not compute as the config says, or cannot run."""
    method = getattr(config, "topk_method", None)
    if method not in (None, "noaux_tc"):
        raise ValueError(f"topk_method {method!r} is not supported; DeepSeek-V3 routes with 'noaux_tc' "
                         "(transformers' DeepseekV3TopkRouter)")
    scoring = getattr(config, "scoring_func", None)
    if scoring not in (None, "sigmoid"):
        raise ValueError(f"scoring_func {scoring!r} is not supported; DeepSeek-V3 scores experts with 'sigmoid'")
    check_latent_attention(config)
    check_group_routing(config)


def check_latent_attention(config) -> None:
    """Refuses what the latent attention and the experts' MLPs of DeepSeek-V2 and V3 do not compute:
    another activation, fewer key/value heads than heads."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads not in (None, heads):
        raise ValueError(f"num_key_value_heads={kv_heads} is not supported: multi-head latent attention expands "
                         f"keys and values for every head (num_attention_heads={heads})")


def sparse_layers(config) -> list[bool]:
    """Which layers hold the MoE: those ``mlp_layer_types`` calls ``"sparse"`` (GLM-4.5 Lite's), or
    else those from ``first_k_dense_replace`` on (DeepSeek-V3's, GLM-4.5's)."""
    n, types = config.num_hidden_layers, getattr(config, "mlp_layer_types", None)
    if types is None:
        return [i >= config.first_k_dense_replace for i in range(n)]
    unknown = sorted(set(types) - {"dense", "sparse"})
    if unknown or len(types) != n:
        raise ValueError(f"mlp_layer_types must give 'dense' or 'sparse' for each of the {n} layers; found "
                         f"{list(types)}")
    return [t == "sparse" for t in types]


def check_group_routing(config, sparse: bool | None = None) -> None:
    """Refuses expert groups that :func:`group_limited_routing` cannot split as the config says
    (when any layer is sparse: ``sparse``, or else by :func:`sparse_layers`): DeepSeek-V3's,
    GLM-4.5's and Nemotron-H's ``n_group``, ``topk_group``, top k."""
    if any(sparse_layers(config)) if sparse is None else sparse:
        e, groups, chosen, k = expert_count(config), config.n_group, config.topk_group, config.num_experts_per_tok
        if not groups or e % groups or e // groups < 2:
            raise ValueError(f"n_group={groups} must divide n_routed_experts={e} into groups of two or more experts")
        if not chosen or not 1 <= chosen <= groups:
            raise ValueError(f"topk_group={chosen} must be between 1 and n_group={groups}")
        if not k or not 1 <= k <= chosen * (e // groups):
            raise ValueError(f"num_experts_per_tok={k} must be between 1 and the {chosen * (e // groups)} experts of "
                             f"topk_group={chosen} groups")


def softmax_scale(config) -> float:
    """``qk_head_dim ** -0.5``, times YaRN's ``mscale ** 2`` (transformers' ``yarn_apply_mscale``)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    p = rope_parameters(config)
    if p["rope_type"] != "default" and p.get("mscale_all_dim"):
        factor = p.get("factor")
        if factor is None:
            raise ValueError(f"rope_parameters: mscale_all_dim scales the attention by its factor; found no factor "
                             f"({sorted(p)})")
        mscale = 1.0 if factor <= 1 else 0.1 * p["mscale_all_dim"] * float(np.log(factor)) + 1.0
        scale = scale * mscale * mscale
    return scale


class DeepseekV3Attention(LlamaAttention):
    """Multi-head latent attention (see the module's docstring)."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, layer_idx)
        h, heads = config.hidden_size, config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.interleave = bool(getattr(config, "rope_interleave", True))
        bias = bool(getattr(config, "attention_bias", False))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        qk = self.nope_dim + self.rope_dim
        self.q_proj = self.q_a_proj = self.q_a_layernorm = self.q_b_proj = nnx.data(None)
        if self.q_lora_rank is None:
            self.q_proj = nnx.Linear(h, heads * qk, use_bias=False, **kw)
        else:
            self.q_a_proj = nnx.Linear(h, self.q_lora_rank, use_bias=bias, **kw)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, epsilon=1e-6, **kw)  # transformers' default eps
            self.q_b_proj = nnx.Linear(self.q_lora_rank, heads * qk, use_bias=False, **kw)
        self.kv_a_proj_with_mqa = nnx.Linear(h, self.kv_lora_rank + self.rope_dim, use_bias=bias, **kw)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, epsilon=1e-6, **kw)
        self.kv_b_proj = nnx.Linear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), use_bias=False, **kw)
        self.o_proj = nnx.Linear(heads * self.v_dim, h, use_bias=bias, **kw)

    def set_layout(self, config, layer_idx: int) -> None:
        super().set_layout(config, layer_idx)
        self.head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.num_kv_heads = self.num_heads
        self.scale = softmax_scale(config)

    def rotate(self, x, cos, sin):
        """RoPE on ``[..., qk_rope_head_dim]``; interleaved pairs are gathered into halves first
        (transformers' ``apply_rotary_pos_emb_interleave`` gives that order too)."""
        if self.interleave:
            x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        return apply_rotary(x, cos, sin)

    def project(self, x):
        """Queries ``[b, s, heads, qk_head_dim]`` before RoPE, the normalised latent ``[b, s,
        kv_lora_rank]`` and the shared rotary key ``[b, s, 1, qk_rope_head_dim]`` before RoPE."""
        b, s, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        latent, k_rot = jnp.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank], axis=-1)
        return (q.reshape(b, s, self.num_heads, self.head_dim), self.kv_a_layernorm(latent),
                k_rot.reshape(b, s, 1, self.rope_dim))

    def expand(self, latent, k_rot):
        """Every head's keys ``[b, n, heads, qk_head_dim]`` and values ``[b, n, heads, v_head_dim]``
        from the latent ``[b, n, kv_lora_rank]`` and the turned rotary key ``[b, n, 1, rope]``."""
        b, n, _ = latent.shape
        kv = self.kv_b_proj(latent).reshape(b, n, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = jnp.split(kv, [self.nope_dim], axis=-1)
        k_rot = jnp.broadcast_to(k_rot.astype(k_nope.dtype), (b, n, self.num_heads, self.rope_dim))
        return jnp.concatenate([k_nope, k_rot], axis=-1), v

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None,
                 query_scale=None):
        """As Llama's attention; ``query_scale`` (``[batch, seq]``, or ``None``) multiplies each
        token's query (Mistral 4's position-dependent Llama 4 scale). The cache holds the latent
        (``"k"``) and the turned rotary key (``"v"``), as transformers' does; every call expands
        all of its slots."""
        b, s, _ = x.shape
        q, latent, k_rot = self.project(x)
        q = jnp.concatenate([q[..., : self.nope_dim], self.rotate(q[..., self.nope_dim:], cos, sin)], axis=-1)
        if query_scale is not None:
            q = q * query_scale[:, :, None, None].astype(q.dtype)
        k_rot = self.rotate(k_rot, cos, sin)
        if cache is not None:
            cache = attn.update_kv_cache(cache, latent[:, :, None, :], k_rot, cache_index)
            latent, k_rot = cache["k"][:, :, 0, :], cache["v"]
        k, v = self.expand(latent, k_rot)
        out = attn.dot_product_attention(q, k, v, masks[self.window], scale=self.scale, dropout_rate=self.dropout_rate,
                                         dropout_rng=dropout_rng, causal_offset=attn.causal_offset(cache, None,
                                                                                                   cache_index))
        return self.o_proj(out.reshape(b, s, -1)), cache


def group_limited_routing(scores, choice, *, top_k: int, n_group: int, topk_group: int, renormalise: bool,
                          scaling: float) -> tuple[jax.Array, jax.Array]:
    """Each token's ``(weights, experts)`` (``[tokens, top_k]``) from its ``scores`` and ``choice``
    (``[tokens, experts]``), as transformers' DeepSeek-V3 and Mistral 4 routers.

    Experts are chosen by ``choice`` among the ``topk_group`` of ``n_group`` groups whose two best
    ``choice`` values sum highest; they are weighted by ``scores``, renormalised to sum to one if
    ``renormalise`` (with transformers' ``1e-20``), times ``scaling``.
    """
    t, e = choice.shape
    group_scores = jnp.sum(jax.lax.top_k(choice.reshape(t, n_group, e // n_group), 2)[0], axis=-1)
    _, groups = jax.lax.top_k(group_scores, topk_group)
    kept = jnp.any(jax.nn.one_hot(groups, n_group, dtype=bool), axis=-2)  # [tokens, groups]
    choice = jnp.where(jnp.repeat(kept, e // n_group, axis=-1), choice, -jnp.inf)
    return top_k_by_choice(scores, choice, top_k, renormalise, scaling, epsilon=1e-20)


def noaux_tc_routing(logits, bias, **kwargs) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V3's "noaux_tc" routing (:func:`group_limited_routing`): scores
    ``sigmoid(logits)``, experts chosen by score + ``bias`` (``e_score_correction_bias``)."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    return group_limited_routing(scores, scores + bias.astype(jnp.float32)[None, :], **kwargs)


class DeepseekV3TopkRouter(ParamReader, nnx.Module):
    """``mlp.gate``: ``weight [experts, hidden]`` (LoRA-adaptable through ``target_parameters``,
    ``"gate.weight"``) and ``e_score_correction_bias [experts]``, both float32."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "weight": ("weight", False), "e_score_correction_bias": ("e_score_correction_bias", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e = expert_count(config)
        init = nnx.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (e, config.hidden_size), jnp.float32))
        self.e_score_correction_bias = nnx.Param(jnp.zeros((e,), jnp.float32))
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.renormalise, self.scaling = bool(config.norm_topk_prob), float(config.routed_scaling_factor)

    def __call__(self, x):
        """``(router logits [tokens, experts], weights [tokens, k], experts [tokens, k])`` of ``x [tokens, hidden]``."""
        logits = x.astype(jnp.float32) @ self.param_value("weight").astype(jnp.float32).T
        weights, index = noaux_tc_routing(logits, self.param_value("e_score_correction_bias"), top_k=self.top_k,
                                          n_group=self.n_group, topk_group=self.topk_group,
                                          renormalise=self.renormalise, scaling=self.scaling)
        return logits, weights, index


class DeepseekV3MoE(nnx.Module):
    """The routed experts, the router and the shared experts of a sparse layer."""

    router_class: ClassVar[type[nnx.Module]] = DeepseekV3TopkRouter

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dispatch = expert_dispatch(config)
        self.experts = MixtralExperts(config, config.moe_intermediate_size, **kw)
        self.gate = self.router_class(config, **kw)
        self.shared_experts = LlamaMLP(config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts,
                                       **kw)

    def __call__(self, x):
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        _, weights, index = self.gate(flat)
        routed = self.experts.routed(flat, weights, index, self.dispatch)
        return routed.astype(x.dtype).reshape(b, s, h) + self.shared_experts(x)


class DeepseekV3DecoderLayer(LlamaDecoderLayer):
    """Pre-norm latent attention, then a dense MLP (the first ``first_k_dense_replace`` layers) or the MoE."""

    attention_class: ClassVar[type[nnx.Module]] = DeepseekV3Attention
    moe_class: ClassVar[type[nnx.Module]] = DeepseekV3MoE

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.mlp = self.moe_class(config, **kw) if self.is_sparse(config, layer_idx) else LlamaMLP(config, **kw)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=eps, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, epsilon=eps, **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return sparse_layers(config)[layer_idx]

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None,
                 query_scale=None):
        attn_key, _ = split_keys(dropout_rng, 2)
        scaled = {} if query_scale is None else {"query_scale": query_scale}  # Mistral 4's; GLM-4.5 takes a prefix
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, masks, cache, cache_index, prefix, attn_key,
                                  **scaled)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def check_same_mlp(config) -> None:
    """Refuses ``scan_layers=True`` over dense layers (below ``first_k_dense_replace``, or as
    ``mlp_layer_types`` says) and sparse ones."""
    sparse = sparse_layers(config)
    if len(set(sparse)) > 1 and getattr(config, "mlp_layer_types", None) is not None:
        raise ValueError(f"scan_layers=True needs the same MLP in every layer; mlp_layer_types="
                         f"{list(config.mlp_layer_types)}")
    if len(set(sparse)) > 1:
        raise ValueError(f"scan_layers=True needs the same MLP in every layer; layers "
                         f"0..{config.first_k_dense_replace - 1} are dense and the others sparse "
                         f"(first_k_dense_replace={config.first_k_dense_replace})")


class DeepseekV3Model(LlamaModel):
    """The decoder stack (``embed_tokens``, ``layers``, ``norm``) of latent-attention layers."""

    layer_class: ClassVar[type[nnx.Module]] = DeepseekV3DecoderLayer
    check_config = staticmethod(check_deepseek_config)  # what the family refuses by name

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.check_config(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rope = 2 * len(self.rotary.inv_freq)
        if rope != config.qk_rope_head_dim:  # transformers' RoPE reads head_dim (and partial_rotary_factor)
            raise ValueError(f"the RoPE turns {rope} dimensions (head_dim={config.head_dim} x partial_rotary_factor="
                             f"{rope_parameters(config).get('partial_rotary_factor', 1.0)}) but qk_rope_head_dim="
                             f"{config.qk_rope_head_dim}; they must be equal")

    @staticmethod
    def check_scan(config) -> None:
        check_same_mlp(config)

    def query_scale(self, position_ids, dtype):
        """What multiplies each token's query, ``[batch, seq]`` (``None``: nothing; Mistral 4 scales)."""
        return None

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """As :meth:`LlamaModel.__call__` (packed rows too); ``prefix_kv`` must be ``None`` (no prefix
        attention protocol)."""
        if prefix_kv is not None:
            raise ValueError(f"{type(self).__name__} does not take prefix_kv: prefix tuning is not supported on "
                             "multi-head latent attention")
        segment_ids, attention_mask, position_ids = self.packed_inputs(segment_ids, attention_mask, position_ids,
                                                                       cache, None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(jnp.asarray(input_ids))
        x = jnp.asarray(inputs_embeds)
        b, s, _ = x.shape
        pos = attn.decoder_positions(b, s, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                     cache_index=cache_index, prefix_kv=None, num_layers=len(self.layers),
                                     owner=type(self).__name__, prefix_layout=lambda: (0, 0))
        mask = attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True)
        masks = {None: attn.within_segments(mask, segment_ids)}
        cos, sin = self.rotary.cos_sin(pos.position_ids, x.dtype)
        scale = self.query_scale(pos.position_ids, x.dtype)
        if cache is None:  # training and scoring: scanned and/or rematerialised
            x = run_layers(self.layers, lambda layer, h, k: layer(h, cos, sin, masks, dropout_rng=k,
                                                                  query_scale=scale)[0], x, self.remat, dropout_rng)
            return ModelOutput(last_hidden_state=self.norm(x), past_key_values=None)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, masks, cache[i], pos.start, None, layer_key(dropout_rng, i),
                                   query_scale=scale)
            new_cache.append(layer_cache)
        return ModelOutput(last_hidden_state=self.norm(x), past_key_values=new_cache)


def init_latent_attention_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """Per layer, as transformers' cache of latent attention: ``"k"``, the normalised latent
    ``[batch, max_len, 1, kv_lora_rank]``, and ``"v"``, the turned rotary key ``[batch, max_len, 1,
    qk_rope_head_dim]`` (a token's keys and values are expanded from them by ``kv_b_proj``)."""
    k, v = (batch, max_len, 1, config.kv_lora_rank), (batch, max_len, 1, config.qk_rope_head_dim)
    return [{"k": jnp.zeros(k, dtype), "v": jnp.zeros(v, dtype)} for _ in range(config.num_hidden_layers)]


class MlaForCausalLM(LlamaForCausalLM):
    """A latent-attention causal LM (DeepSeek-V3's, Mistral 4's): Llama's head, no ``prefix_kv``."""

    model_class: ClassVar[type[nnx.Module]] = DeepseekV3Model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :meth:`LlamaForCausalLM.__call__` (packed rows too), without ``prefix_kv`` (prefix tuning
        is refused)."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_latent_attention_cache(self.config, batch, max_len, dtype or self.dtype)


class MlaForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = DeepseekV3Model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 dropout_rng=None, segment_ids=None, segment_starts=None) -> ModelOutput:
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, None, dropout_rng,
                                segment_ids=segment_ids, segment_starts=segment_starts)


class MlaForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = DeepseekV3Model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 dropout_rng=None) -> ModelOutput:
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, None, dropout_rng)


class DeepseekV3ForCausalLM(_MoeCheckpoints, MlaForCausalLM):
    """DeepSeek-V3: latent attention, dense then sparse layers with shared experts."""

    expert_layout: ClassVar[ExpertLayout] = DEEPSEEK_EXPERTS


class DeepseekV3ForSequenceClassification(_MoeCheckpoints, MlaForSequenceClassification):
    expert_layout: ClassVar[ExpertLayout] = DEEPSEEK_EXPERTS


class DeepseekV3ForTokenClassification(_MoeCheckpoints, MlaForTokenClassification):
    expert_layout: ClassVar[ExpertLayout] = DEEPSEEK_EXPERTS


register(DeepseekV3ForCausalLM, model_types=("deepseek_v3",), default=True)
register(DeepseekV3ForSequenceClassification)
register(DeepseekV3ForTokenClassification)
