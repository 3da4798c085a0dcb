"""Mixtral in Flax NNX: the Mistral decoder with a sparse mixture-of-experts MLP, under transformers' names.

What differs from Llama is the MLP, ``mlp`` (transformers' ``MixtralSparseMoeBlock``):

* ``mlp.gate``, the router: ``weight [experts, hidden]``; each token's routing weights are the
  softmax of its logits (float32), top ``num_experts_per_tok`` of them, renormalised to sum to one.
* ``mlp.experts``: every expert's weights fused into 3-D parameters as transformers 5 stores them,
  ``gate_up_proj [experts, 2 * intermediate, hidden]`` (``[gate | up]``) and
  ``down_proj [experts, hidden, intermediate]``; an expert computes
  ``down @ (silu(gate @ x) * (up @ x))``.

By default the experts run densely: every token goes through every expert and the outputs are
summed with the routing weights, zero outside the token's top k. That is jit- and
sharding-friendly (static shapes; the expert axis shards like any other dimension) and equals
transformers' sparse dispatch, at ``num_local_experts / num_experts_per_tok`` times the MLP FLOPs
of a sparse kernel. The model option ``expert_dispatch="grouped"`` (``from_pretrained(...,
expert_dispatch="grouped")``) runs each token through its top k only: assignments sorted by
expert and multiplied with ``jax.lax.ragged_dot``, the grouped GEMM that XLA runs natively on
GPU and TPU. On XLA:CPU that op is slower than the dense run (at 1,024 tokens, 64 experts, top 4,
hidden 512: 1.6 s against 0.5 s forward, 5.3 s against 1.1 s with gradients), so the default stays
dense; the grouped path's speed on an accelerator is unmeasured here (no device was lent).

Checkpoints: the Hub's layout (``block_sparse_moe.gate.weight`` and one ``w1``/``w2``/``w3``
linear per expert, ``w1``: gate, ``w3``: up, ``w2``: down) and transformers 5's fused in-memory
layout (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) both load;
``save_pretrained`` writes the Hub layout, as transformers 5.24's ``save_pretrained`` does. A LoRA
adapter file of the per-expert layout is fused on load (:func:`fused_lora_tensors`), as PEFT 0.22.0 does.

The pieces are the shared base of the bundled mixtures of experts (``_qwen3_moe`` and
``_qwen2_moe`` too; with many small experts the dense run costs more: Qwen3-30B-A3B's 128 experts,
top 8, spend 16 times a sparse kernel's MLP FLOPs and hold ``[tokens, experts, 2 * I]``): a family
names its block's sizes and top-k weighting (:class:`MixtralSparseMoeBlock`), which layers are
sparse (:meth:`MixtralDecoderLayer.is_sparse`; a dense layer has no router, and the load-balancing
loss and ``router_logits`` cover the sparse layers) and its Hub names (:class:`ExpertLayout`).

Training: ``router_jitter_noise`` multiplies the MLP's input by ``uniform(1 - j, 1 + j)`` noise
while a dropout key is active (``peftjax.dropout_key``, the train step's key), as transformers does
in ``train()`` mode (the noise itself is JAX's, not torch's). With ``output_router_logits`` (the
config's, or the call's argument) the causal LM returns ``aux_loss``, transformers'
``load_balancing_loss_func`` over all layers (padding excluded by ``attention_mask``), and adds
``router_aux_loss_coef * aux_loss`` to the loss when there are labels; ``router_logits`` then
holds each layer's router logits ``[batch * seq, experts]`` (padding included), as transformers'
``MoeCausalLMOutputWithPast.router_logits``.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Mapping
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.io._errors import CheckpointError
from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    kv_layout,
    packed_kwargs,
    sliding_windows,
)
from peftjax.models._losses import causal_lm_head_loss
from peftjax.models._outputs import ModelOutput, kept_positions
from peftjax.nn._dropout import layer_key
from peftjax.nn._scan import run_layers
from peftjax.nn._dropout import active_dropout_key, fold_key
from peftjax.nn._param_reader import ParamReader
from peftjax.nn._norm import RMSNorm
from peftjax.nn._functional import swiglu


def expert_count(config) -> int:
    """The number of routed experts: ``num_local_experts`` (Mixtral, Qwen3-MoE) or ``num_experts``
    (Qwen2-MoE, whose config has no alias)."""
    count = getattr(config, "num_local_experts", None)
    return config.num_experts if count is None else count


def check_mixtral_config(config) -> None:
    """Refuses by name what this implementation does not do."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
    check_top_k(config)


def check_top_k(config) -> None:
    """Refuses a ``num_experts_per_tok`` outside ``[1, experts]``."""
    e, k = expert_count(config), config.num_experts_per_tok
    if not 1 <= k <= e:
        raise ValueError(f"num_experts_per_tok={k} must be between 1 and num_local_experts={e}")


EXPERT_DISPATCH = ("dense", "grouped")


def expert_dispatch(config) -> str:
    """The model option ``expert_dispatch`` (``"dense"`` by default), checked."""
    dispatch = getattr(config, "expert_dispatch", "dense") or "dense"
    if dispatch not in EXPERT_DISPATCH:
        raise ValueError(f"expert_dispatch={dispatch!r} is not an option; choose one of {list(EXPERT_DISPATCH)}")
    return dispatch


def top_k_routing(logits: jax.Array, top_k: int, renormalise: bool = True) -> tuple[jax.Array, jax.Array]:
    """Each token's ``(weights, experts)`` (``[tokens, top_k]`` each): the softmax's top ``top_k``,
    renormalised to sum to one if ``renormalise``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, index = jax.lax.top_k(probs, top_k)
    if renormalise:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return top, index


def top_k_by_choice(scores: jax.Array, choice: jax.Array, top_k: int, renormalise: bool, scaling: float,
                    epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Each token's ``(weights, experts)`` (``[tokens, top_k]``): the experts of the highest
    ``choice``, weighted by their ``scores``, renormalised to sum to one (plus ``epsilon``, the
    family's) if ``renormalise``, times ``scaling`` (the sigmoid routers: DeepSeek-V3's, LFM2-MoE's)."""
    _, index = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, index, axis=-1)
    if renormalise:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + epsilon)
    return weights * scaling, index


def route(logits: jax.Array, top_k: int, renormalise: bool = True) -> jax.Array:
    """Dense routing weights ``[tokens, experts]``: :func:`top_k_routing`'s, 0 elsewhere."""
    top, index = top_k_routing(logits, top_k, renormalise)
    return jnp.sum(jax.nn.one_hot(index, logits.shape[-1], dtype=jnp.float32) * top[..., None], axis=-2)


def routing_statistics(logits: jax.Array, top_k: int, token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's ``(top-k assignments per expert, summed router probabilities per expert)``
    over the tokens ``token_mask`` keeps: the sums ``load_balancing_loss_func`` accumulates."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, index = jax.lax.top_k(probs, top_k)
    counts = jnp.einsum("tke,t->e", jax.nn.one_hot(index, logits.shape[-1], dtype=jnp.float32), token_mask)
    return counts, jnp.einsum("te,t->e", probs, token_mask)


def load_balancing_loss(counts: jax.Array, probs: jax.Array, rows: jax.Array) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` from the statistics summed over the layers;
    ``rows`` is the number of (unpadded) tokens times the number of layers."""
    return jnp.sum((counts / rows) * (probs / rows)) * counts.shape[-1]


class MixtralTopKRouter(ParamReader, nnx.Module):
    """``mlp.gate``: the router's ``weight [experts, hidden]`` (torch layout; not an ``nnx.Linear``:
    LoRA adapts it through ``target_parameters=["gate.weight"]``, as PEFT does transformers' router)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        self.weight = nnx.Param(init(rngs.params(), (expert_count(config), config.hidden_size), param_dtype))
        self.dtype = dtype

    def __call__(self, x):
        return x @ self.param_value("weight").astype(self.dtype).T


class MixtralExperts(ParamReader, nnx.Module):
    """``mlp.experts``: ``gate_up_proj [experts, 2I, hidden]`` and ``down_proj [experts, hidden, I]``
    (both LoRA-adaptable through ``target_parameters``)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "gate_up_proj": ("gate_up_proj", False), "down_proj": ("down_proj", False)}

    def __init__(self, config, intermediate_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, i = expert_count(config), config.hidden_size, intermediate_size
        init = nnx.initializers.normal(config.initializer_range)
        self.gate_up_proj = nnx.Param(init(rngs.params(), (e, 2 * i, h), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, h, i), param_dtype))
        self.dtype = dtype

    def __call__(self, x, weights):
        """``x [tokens, hidden]`` through every expert, summed with ``weights [tokens, experts]``."""
        gate_up = jnp.einsum("th,eoh->teo", x, self.param_value("gate_up_proj").astype(self.dtype))
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out = jnp.einsum("tei,ehi->teh", swiglu(gate, up), self.param_value("down_proj").astype(self.dtype))
        return jnp.einsum("teh,te->th", out, weights.astype(out.dtype))

    def routed(self, x, top, index, dispatch: str):
        """``x [tokens, hidden]`` through its experts ``index`` (``[tokens, k]``) weighted by ``top``:
        :meth:`grouped` (``dispatch="grouped"``) or every expert, the others weighted 0 (``"dense"``)."""
        if dispatch == "grouped":
            return self.grouped(x, top, index)
        experts = self.gate_up_proj.get_value().shape[0]
        return self(x, jnp.sum(jax.nn.one_hot(index, experts, dtype=jnp.float32) * top[..., None], axis=-2))

    def grouped(self, x, top, index):
        """``x [tokens, hidden]`` through its own top-k experts only: the ``tokens * k`` assignments
        sorted by expert, each expert's rows multiplied as one group (``jax.lax.ragged_dot``, a
        grouped GEMM on GPU and TPU), weighted by ``top`` and summed back per token."""
        t, k = index.shape
        flat = index.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
        rows = order // k  # the token of each sorted assignment
        gate_up_proj = self.param_value("gate_up_proj")  # [experts, 2I, hidden]
        sizes = jnp.bincount(flat, length=gate_up_proj.shape[0]).astype(jnp.int32)
        contract_last = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])

        def grouped_dot(lhs, weight):  # [rows, in] x [experts, out, in] -> [rows, out]
            return jax.lax.ragged_dot_general(lhs, weight.astype(self.dtype), sizes, contract_last)

        gate, up = jnp.split(grouped_dot(x[rows], gate_up_proj), 2, axis=-1)
        out = grouped_dot(swiglu(gate, up), self.param_value("down_proj"))
        out = out * top.reshape(-1)[order][:, None].astype(out.dtype)
        return jnp.zeros((t, out.shape[-1]), out.dtype).at[rows].add(out)


class MixtralSparseMoeBlock(nnx.Module):
    """The router and the experts. A family whose block differs only in its sizes or in how it
    weighs the top k overrides :meth:`expert_size` and :meth:`renormalises`; ``router_name`` is the
    router's attribute (Mixtral's ``gate``, Granite MoE's ``router``)."""

    router_name: ClassVar[str] = "gate"

    def __init__(self, config, layer_idx: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_mixtral_config(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.top_k = config.num_experts_per_tok
        self.renormalise = self.renormalises(config)
        self.dispatch = expert_dispatch(config)
        self.jitter_noise = float(getattr(config, "router_jitter_noise", 0.0) or 0.0)
        self.layer_idx = layer_idx
        setattr(self, self.router_name, MixtralTopKRouter(config, **kw))
        self.experts = MixtralExperts(config, self.expert_size(config), **kw)

    @staticmethod
    def expert_size(config) -> int:
        """One expert's intermediate size."""
        return config.intermediate_size

    @staticmethod
    def renormalises(config) -> bool:
        """Whether a token's top-k routing weights are rescaled to sum to one (Mixtral: always)."""
        return True

    def __call__(self, x):
        """``(output [b, s, hidden], router logits [b * s, experts])``."""
        b, s, h = x.shape
        key = active_dropout_key()
        if self.jitter_noise > 0 and key is not None:  # training: transformers' router jitter
            key = fold_key(key, zlib.crc32(f"mlp.jitter.{self.layer_idx}".encode()))
            x = x * jax.random.uniform(key, x.shape, x.dtype, 1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        flat = x.reshape(b * s, h)
        logits = getattr(self, self.router_name)(flat)
        if self.dispatch == "grouped":
            out = self.experts.grouped(flat, *top_k_routing(logits, self.top_k, self.renormalise))
        else:
            out = self.experts(flat, route(logits, self.top_k, self.renormalise))
        return out.reshape(b, s, h), logits


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with the MoE block as ``mlp`` (or, where :meth:`is_sparse` says no, the
    dense ``mlp_class``); also returns the router logits (``None`` from a dense layer)."""

    moe_class: ClassVar[type[nnx.Module]] = MixtralSparseMoeBlock
    mlp_name: ClassVar[str] = "mlp"  # the MLP's attribute (Granite MoE's: block_sparse_moe)

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        setattr(self, self.mlp_name, self.moe_class(config, layer_idx, **kw) if self.is_sparse(config, layer_idx)
                else self.mlp_class(config, **kw))
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=eps, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, epsilon=eps, **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` routes through experts (Mixtral: every layer)."""
        return True

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, masks, cache, cache_index, prefix, dropout_rng)
        x = x + a
        if not isinstance(self.mlp, self.moe_class):  # a dense layer (is_sparse said no)
            return x + self.mlp(self.post_attention_layernorm(x)), cache, None
        out, logits = self.mlp(self.post_attention_layernorm(x))
        return x + out, cache, logits


def _token_mask(attention_mask, b: int, s: int) -> jax.Array:
    """``[b * s]`` float weights of the real tokens (the mask's last ``s`` columns; all ones without one)."""
    if attention_mask is None:
        return jnp.ones((b * s,), jnp.float32)
    mask = jnp.asarray(attention_mask)
    return mask[:, mask.shape[1] - s:].reshape(b * s).astype(jnp.float32)


class MixtralModel(LlamaModel):
    """The decoder stack; its output also carries ``aux_loss``, the load-balancing loss."""

    layer_class: ClassVar[type[nnx.Module]] = MixtralDecoderLayer
    # whether each layer gets its own window's mask from the stack (its attention's window is None):
    # layers of different windows then scan (GPT-OSS)
    mask_per_layer: ClassVar[bool] = False

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        sparse = [self.layer_class.is_sparse(config, i) for i in range(config.num_hidden_layers)]
        if getattr(config, "scan_layers", False) and len(set(sparse)) > 1:
            raise ValueError(f"scan_layers=True needs the same MLP in every layer; layers "
                             f"{[i for i, s in enumerate(sparse) if not s]} are dense and the others sparse "
                             f"(mlp_only_layers={getattr(config, 'mlp_only_layers', None)}, "
                             f"decoder_sparse_step={getattr(config, 'decoder_sparse_step', None)})")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.sparse_layers = sum(sparse)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        cache=None,
        cache_index=None,
        prefix_kv=None,
        dropout_rng=None,
        output_router_logits: bool = False,
        segment_ids=None,
    ) -> ModelOutput:
        """As :meth:`LlamaModel.__call__` (packed rows too: each token routed as unpacked, the
        load-balancing statistics over the same real tokens); ``aux_loss`` is ``None`` on the
        KV-cache path (generation).

        ``output_router_logits``: also return ``router_logits``, one ``[batch * seq, experts]``
        array per layer (padding included), as transformers' ``MoeModelOutputWithPast``.
        """
        segment_ids, attention_mask, position_ids = self.packed_inputs(segment_ids, attention_mask, position_ids,
                                                                       cache, prefix_kv)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(jnp.asarray(input_ids))
        x = jnp.asarray(inputs_embeds)
        b, s, _ = x.shape
        pos = attn.decoder_positions(
            b, s, attention_mask=attention_mask, position_ids=position_ids, cache=cache, cache_index=cache_index,
            prefix_kv=prefix_kv, num_layers=len(self.layers), owner=type(self).__name__,
            prefix_layout=lambda: kv_layout(self.config),
        )
        windows = sliding_windows(self.config)
        distinct = sorted(set(windows), key=str)
        masks = self.attention_masks(pos, segment_ids)  # each window's, within each packed sequence
        if self.mask_per_layer:  # layer i looks up its window's mask by index (static windows would not scan)
            table = jnp.stack([masks[w] for w in distinct])
            which = jnp.asarray([distinct.index(w) for w in windows], jnp.int32)
        cos, sin = self.rotary.cos_sin(pos.position_ids, x.dtype)
        top_k, token_mask = self.config.num_experts_per_tok, _token_mask(attention_mask, b, s)
        zeros = jnp.zeros((expert_count(self.config),), jnp.float32)

        # the router logits go into a [sparse layers, tokens, experts] buffer, the same whether scanned or looped
        routers = None
        if output_router_logits:
            routers = (jnp.zeros((), jnp.int32), jnp.zeros((self.sparse_layers, b * s, zeros.shape[0]), x.dtype))

        def layer_step(layer, carry, layer_cache=None, start=None, prefix=None, key=None):
            h, counts, probs, routers, i = carry
            layer_masks = {None: table[which[i]]} if self.mask_per_layer else masks
            h, layer_cache, logits = layer(h, cos, sin, layer_masks, layer_cache, start, prefix, key)
            if logits is None:  # a dense layer: no router
                return (h, counts, probs, routers, i + 1), layer_cache
            c, p = routing_statistics(logits, top_k, token_mask)
            if routers is not None:
                routers = (routers[0] + 1, routers[1].at[routers[0]].set(logits.astype(routers[1].dtype)))
            return (h, counts + c, probs + p, routers, i + 1), layer_cache

        carry = (x, zeros, zeros, routers, jnp.zeros((), jnp.int32))
        new_cache = [] if cache is not None else None
        if cache is None and prefix_kv is None:  # training and scoring: scanned and/or rematerialised
            carry = run_layers(self.layers, lambda layer, c, k: layer_step(layer, c, key=k)[0], carry, self.remat,
                               dropout_rng)
        for i, layer in enumerate(self.layers if cache is not None or prefix_kv is not None else ()):
            prefix = None if prefix_kv is None else prefix_kv[i]
            carry, layer_cache = layer_step(layer, carry, None if cache is None else cache[i], pos.start, prefix,
                                            layer_key(dropout_rng, i))
            if cache is not None:
                new_cache.append(layer_cache)
        x, counts, probs, routers, _ = carry
        aux = None
        if cache is None:  # over the sparse layers only, as transformers records only their routers
            aux = load_balancing_loss(counts, probs, jnp.sum(token_mask) * max(self.sparse_layers, 1))
        router_logits = None if routers is None else tuple(routers[1])
        return ModelOutput(last_hidden_state=self.norm(x), past_key_values=new_cache, aux_loss=aux,
                           router_logits=router_logits)


# ---------------------------------------------------------------- checkpoint layouts


class ExpertLayout(NamedTuple):
    """How a family's Hub checkpoints name what transformers 5 fuses: the MoE block (``block``;
    the router is ``{block}.gate``, ``mlp.{router}`` in memory) and each expert's gate, up and down
    linears (``{block}.experts.{e}.{gate|up|down}.weight``)."""

    family: str
    block: str
    gate: str
    up: str
    down: str
    router: str = "gate"
    memory_block: str = "mlp"  # the block's name in memory (transformers 5's; LFM2-MoE keeps feed_forward)

    def expert_key(self, e: int, linear: str) -> str:
        return f"{self.block}.experts.{e}.{linear}.weight"


MIXTRAL_EXPERTS = ExpertLayout("Mixtral", "block_sparse_moe", gate="w1", up="w3", down="w2")


class _FusedExperts(Mapping):
    """A checkpoint in the Hub's per-expert layout read as transformers 5's fused layout (a view:
    each fused tensor is assembled when it is looked up); other keys pass through."""

    def __init__(self, tensors: Mapping, num_experts: int, source: str, layout: ExpertLayout):
        self.tensors, self.num_experts, self.layout = tensors, num_experts, layout
        self.fused: dict[str, tuple[str, str]] = {}  # fused key -> (layer prefix, "gate_up_proj" | "down_proj")
        self.renamed: dict[str, str] = {}  # our key -> checkpoint key
        self.hidden = hidden = set()
        per_expert = re.compile(rf"^(?P<pre>.*)\.{re.escape(layout.block)}\.experts\.\d+\.")
        layers: dict[str, set[str]] = {}
        for key in tensors:
            m = per_expert.match(key)
            if m:
                layers.setdefault(m["pre"], set()).add(key)
                hidden.add(key)
            elif layout.block != layout.memory_block and f".{layout.block}." in key:
                block = f".{layout.memory_block}."
                ours = key.replace(f".{layout.block}.", block)
                self.renamed[ours.replace(f"{block}gate.", f"{block}{layout.router}.")] = key
                hidden.add(key)
        problems = []
        linears = (layout.gate, layout.down, layout.up)
        for prefix, found in sorted(layers.items()):
            wanted = {f"{prefix}.{layout.expert_key(e, w)}" for e in range(num_experts) for w in linears}
            if found - wanted:
                problems.append(f"{prefix}: unexpected expert keys {sorted(found - wanted)[:6]} "
                                f"(num_local_experts={num_experts})")
            if wanted - found:
                problems.append(f"{prefix}: missing expert keys {sorted(wanted - found)[:6]}")
            for name in ("gate_up_proj", "down_proj"):
                fused = f"{prefix}.{layout.memory_block}.experts.{name}"
                if fused in tensors:
                    problems.append(f"{prefix}: both {fused} and per-expert {layout.block}.experts weights")
                self.fused[fused] = (prefix, name)
        if problems:
            raise CheckpointError(f"{source}: a {layout.family} checkpoint in the per-expert layout must hold "
                                  f"{', '.join(linears)} of every expert:\n  " + "\n  ".join(problems))
        self.passed = [k for k in tensors if k not in hidden]

    def __getitem__(self, key: str):
        if key in self.fused:
            prefix, name = self.fused[key]
            layout = self.layout
            get = lambda e, w: np.asarray(self.tensors[f"{prefix}.{layout.expert_key(e, w)}"])  # noqa: E731
            n = self.num_experts
            if name == "down_proj":
                return np.stack([get(e, layout.down) for e in range(n)])
            return np.stack([np.concatenate([get(e, layout.gate), get(e, layout.up)], axis=0) for e in range(n)])
        return self.tensors[self.renamed.get(key, key)]

    def __iter__(self) -> Iterator[str]:
        yield from self.passed
        yield from self.renamed
        yield from self.fused

    def __len__(self) -> int:
        return len(self.passed) + len(self.renamed) + len(self.fused)

    def __contains__(self, key) -> bool:
        return key in self.fused or key in self.renamed or (key in self.tensors and key not in self.hidden)


def hub_layout(state: Mapping[str, np.ndarray], layout: ExpertLayout = MIXTRAL_EXPERTS) -> dict[str, np.ndarray]:
    """A state dict in transformers 5's fused layout written in the Hub's per-expert layout
    (what transformers 5.24's ``save_pretrained`` writes)."""
    out = {}
    for key, value in state.items():
        for name in ("gate_up_proj", "down_proj"):
            suffix = f".{layout.memory_block}.experts.{name}"
            if key.endswith(suffix):
                prefix = key[: -len(suffix)]
                for e, w in enumerate(np.asarray(value)):
                    if name == "down_proj":
                        out[f"{prefix}.{layout.expert_key(e, layout.down)}"] = w
                    else:
                        gate, up = np.split(w, 2, axis=0)
                        out[f"{prefix}.{layout.expert_key(e, layout.gate)}"] = gate
                        out[f"{prefix}.{layout.expert_key(e, layout.up)}"] = up
                break
        else:
            out[key.replace(f".{layout.memory_block}.{layout.router}.weight", f".{layout.block}.gate.weight")] = value
    return out


def fused_lora_tensors(tensors: Mapping[str, np.ndarray], num_experts: int, source: str,
                       layout: ExpertLayout = MIXTRAL_EXPERTS) -> dict[str, np.ndarray]:
    """A LoRA adapter file of transformers 4's per-expert MoE in transformers 5's fused layout, as
    PEFT 0.22.0 converts it on load (what ``target_parameters`` reads: see ``tuners.lora._param``).

    Per layer, the gate and up linears (Mixtral's ``w1``/``w3``, rank ``r`` each) become
    ``gate_up_proj`` at rank ``2r``: expert ``e``'s ``A`` rows are ``[A_gate_e; A_up_e]`` and its
    ``B`` is ``blockdiag(B_gate_e, B_up_e)``, so the delta of each half is unchanged; the down
    linear becomes ``down_proj``. ``A`` is stored ``[E * r, in]`` (expert-major), ``B``
    ``[out, r * E]`` (expert-minor), ``gate_up_proj`` nested inside ``down_proj`` when both are
    there. A router under another block name (Mixtral's ``block_sparse_moe.gate``) is renamed to
    ``mlp.gate``. Other keys pass.

    Raises:
        CheckpointError: an expert, or one of the fused gate/up linears, lacks its LoRA weights.
    """
    per_expert = re.compile(rf"^(?P<pre>.*)\.{re.escape(layout.block)}\.experts\.(?P<e>\d+)\."
                            rf"(?P<w>{layout.gate}|{layout.up}|{layout.down})\.(?P<kind>lora_A|lora_B)\.weight$")
    groups: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
    out = {}
    for key, value in tensors.items():
        m = per_expert.match(key)
        if m:
            groups.setdefault((m["pre"], m["w"], m["kind"]), {})[int(m["e"])] = np.asarray(value, np.float32)
        else:
            out[key.replace(f".{layout.block}.gate.lora_", f".{layout.memory_block}.{layout.router}.lora_")] = value
    gate_up = f"{layout.gate}/{layout.up}"
    for pre in sorted({g[0] for g in groups}):
        def stacked(w, kind):
            found = groups.get((pre, w, kind), {})
            if not found:
                return None
            if sorted(found) != list(range(num_experts)):
                raise CheckpointError(f"{source}: {pre}.{layout.block}.experts.N.{w}.{kind}.weight: expected "
                                      f"experts 0..{num_experts - 1}, found {sorted(found)}")
            return np.stack([found[e] for e in range(num_experts)])  # [E, r, in] or [E, out, r]

        fused = {w: (stacked(w, "lora_A"), stacked(w, "lora_B")) for w in (layout.gate, layout.up, layout.down)}
        present = [w for w, (a, b) in fused.items() if a is not None or b is not None]
        if (any(fused[w][0] is None or fused[w][1] is None for w in present)
                or (layout.gate in present) != (layout.up in present)):
            raise CheckpointError(f"{source}: {pre}.{layout.block}.experts: a LoRA on {gate_up} (fused into "
                                  f"gate_up_proj) needs lora_A and lora_B of both; found those of {present}")
        inner = "base_layer." if layout.down in present else ""
        if layout.gate in present:
            (a1, b1), (a3, b3) = fused[layout.gate], fused[layout.up]
            e, r1, r3 = a1.shape[0], a1.shape[1], a3.shape[1]
            b = np.zeros((e, b1.shape[1] + b3.shape[1], r1 + r3), np.float32)
            b[:, : b1.shape[1], :r1], b[:, b1.shape[1]:, r1:] = b1, b3
            experts = f"{pre}.{layout.memory_block}.experts.{inner}"
            out[f"{experts}lora_A.weight"] = np.concatenate([a1, a3], axis=1).reshape(-1, a1.shape[-1])
            out[f"{experts}lora_B.weight"] = b.transpose(1, 2, 0).reshape(b.shape[1], -1)
        if layout.down in present:
            a2, b2 = fused[layout.down]
            experts = f"{pre}.{layout.memory_block}.experts."
            out[f"{experts}lora_A.weight"] = a2.reshape(-1, a2.shape[-1])
            out[f"{experts}lora_B.weight"] = b2.transpose(1, 2, 0).reshape(b2.shape[1], -1)
    return out


class _MoeCheckpoints:
    """Reads both expert layouts; writes the Hub's (``expert_layout`` names it)."""

    expert_layout: ClassVar[ExpertLayout] = MIXTRAL_EXPERTS

    def fused_adapter_tensors(self, tensors: Mapping[str, np.ndarray], *, source: str) -> dict[str, np.ndarray]:
        """An adapter file's tensors with transformers 4's per-expert LoRA keys fused (PEFT does it on load)."""
        return fused_lora_tensors(tensors, expert_count(self.config), source, self.expert_layout)

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        view = _FusedExperts(state_dict, expert_count(self.config), source, self.expert_layout)
        super().load_hf_state_dict(view, source=source, seed=seed)

    def checkpoint_layout(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return hub_layout(state, self.expert_layout)


class MixtralForCausalLM(_MoeCheckpoints, LlamaForCausalLM):
    """Mixtral: Mistral with a sparse mixture of experts as each layer's MLP."""

    model_class: ClassVar[type[nnx.Module]] = MixtralModel

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
        output_router_logits: bool | None = None,
        dropout_rng=None,
        logits_to_keep=0,
        segment_ids=None,
    ) -> ModelOutput:
        """As :meth:`LlamaForCausalLM.__call__` (packed rows too), plus ``aux_loss`` and
        ``router_logits`` (one ``[batch * seq, experts]`` array per layer) when
        ``output_router_logits`` (default: the config's) asks for them; with ``labels`` the loss
        then includes ``router_aux_loss_coef * aux_loss``."""
        if output_router_logits is None:
            output_router_logits = bool(getattr(self.config, "output_router_logits", False))
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                         dropout_rng, output_router_logits=output_router_logits, **packed_kwargs(self, segment_ids))
        h = out.last_hidden_state
        scaled = self.head_input(h)
        head_in = kept_positions(scaled, logits_to_keep, labels)
        logits = self.model.embed_tokens.attend(head_in) if self.lm_head is None else self.lm_head(head_in)
        aux = out.aux_loss if output_router_logits else None
        loss = None
        if labels is not None:
            loss = causal_lm_head_loss(scaled, logits, jnp.asarray(labels), self.lm_head, self.model.embed_tokens)
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h, past_key_values=out.past_key_values,
                           aux_loss=aux, router_logits=out.router_logits)


class MixtralForSequenceClassification(_MoeCheckpoints, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = MixtralModel


class MixtralForTokenClassification(_MoeCheckpoints, LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = MixtralModel


class MixtralForQuestionAnswering(_MoeCheckpoints, LlamaForQuestionAnswering):
    base_model_prefix: ClassVar[str] = "model"  # transformers' (not ``transformer``, as Llama's)
    model_class: ClassVar[type[nnx.Module]] = MixtralModel


register(MixtralForCausalLM, model_types=("mixtral",), default=True)
register(MixtralForSequenceClassification)
register(MixtralForTokenClassification)
register(MixtralForQuestionAnswering)
