"""Zyphra's Zamba2 (``model_type`` ``"zamba2"``: Zamba2-1.2B, 2.7B, 7B and their instruct models) in
Flax NNX, under transformers' names.

A stack of Mamba-2 layers (``_mamba2``'s mixer: ``n_mamba_heads`` heads of ``mamba_headdim``, the
time steps clamped below at ``time_step_min``) in which the ``"hybrid"`` layers
(``layers_block_type``) first run a *shared* transformer block:

- ``shared_transformer``: the layer's input concatenated with the word embeddings (``2 x hidden``),
  ``input_layernorm``, attention over that width (``head_dim = 2 hidden / heads``, scores scaled by
  ``(head_dim / 2) ** -0.5``, RoPE with ``use_mem_rope``), ``o_proj`` back to the hidden size,
  ``pre_ff_layernorm`` and the gated MLP ``down_proj(act(gate) * up)`` (``gate_up_proj``), no
  residual adds inside;
- its output through ``linear`` is added to the layer's input before ``mamba_decoder``'s norm
  (the residual is the input alone).

The transformer blocks are shared: hybrid layer ``k`` runs block ``k % num_mem_blocks``, whose
weights only the first ``num_mem_blocks`` hybrid layers hold in a checkpoint (transformers ties
the later ones to them). Here each hybrid layer has its own ``shared_transformer`` module whose
weights are the same ``nnx.Param`` objects as its block's first holder's: one array in memory, one
gradient summing every use, and an adapter per layer on them, as PEFT wraps each layer's module
(LoRA on a tied block's ``q_proj`` is that layer's own). Each use also adds its own low-rank
"adapter" of the model (``linear_q/k/v_adapter_list.k`` with ``use_shared_attention_adapter``,
``gate_up_proj_adapter_list.k`` always; ``.0`` down to ``adapter_rank``, ``.1`` up), held in its
block's lists at that use's index.

Zamba (v1) is ``_zamba``. Not here: merging an adapter into a shared block's weight (``merge_and_unload``), which
would change every layer that shares it (refused by name); prefix tuning (the Mamba-2 layers have
no keys); ``scan_layers`` (the layers differ).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._config import LEGACY_LAYER_TYPES
from peftjax.models._hybrid import HybridDecoder, hybrid_inputs
from peftjax.models._llama import LlamaAttention, LlamaForCausalLM, LlamaForSequenceClassification
from peftjax.models._mamba2 import Mamba2Mixer, mamba_cache
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import rotary_embedding
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import layer_key
from peftjax.nn._graph import iter_modules
from peftjax.nn._norm import RMSNorm
from peftjax.nn._scan import run_layers

LAYER_TYPES = ("linear_attention", "hybrid")


def zamba2_layer_types(config) -> list[str]:
    """Each layer's kind (``layers_block_type``): a Mamba-2 layer or a hybrid one.

    Raises:
      ValueError: another kind, or a config whose attention does not tile its width.
    """
    # transformers' older names, remapped on load; an override (set after it) may still use them
    kinds = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in config.layers_block_type]
    unknown = sorted(set(kinds) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"zamba2: layers_block_type {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    if (2 * config.hidden_size) % config.num_attention_heads:
        raise ValueError(f"zamba2: num_attention_heads ({config.num_attention_heads}) must divide 2 x hidden_size "
                         f"({2 * config.hidden_size})")
    return kinds


class _NoAdapter(nnx.Module):
    """A use another block serves: transformers' ``nn.Identity`` slot in an adapter list (no weights)."""


def _adapter_list(config, block: int, uses: int, width_in: int, width_out: int, **kw) -> nnx.List:
    """``uses`` slots, a low-rank pair (``.0``: ``width_in -> adapter_rank``, ``.1``: back up to
    ``width_out``) where the use's block is ``block``, else :class:`_NoAdapter`."""
    rank = config.adapter_rank
    return nnx.List([
        nnx.List([nnx.Linear(width_in, rank, use_bias=False, **kw), nnx.Linear(rank, width_out, use_bias=False, **kw)])
        if i % config.num_mem_blocks == block else _NoAdapter() for i in range(uses)])


def _adapter(adapters: nnx.List, use: int, x):
    """The model's own adapter of ``use`` on ``x`` (added to its projection's output)."""
    down, up = adapters[use]
    return up(down(x))


class Zamba2Attention(LlamaAttention):
    """Attention over the ``2 x hidden`` concatenation; q/k/v plus the use's adapters where the
    config has them."""

    def __init__(self, config, block: int, use: int, uses: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, 0)
        self.scale = (self.head_dim / 2) ** -0.5
        self.use = use
        width = config.attention_hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(width, self.num_heads * self.head_dim, use_bias=False, **kw)
        self.k_proj = nnx.Linear(width, self.num_kv_heads * self.head_dim, use_bias=False, **kw)
        self.v_proj = nnx.Linear(width, self.num_kv_heads * self.head_dim, use_bias=False, **kw)
        self.o_proj = nnx.Linear(self.num_heads * self.head_dim, config.hidden_size, use_bias=False, **kw)
        self.adapted = bool(config.use_shared_attention_adapter)
        if self.adapted:
            for name in ("q", "k", "v"):
                setattr(self, f"linear_{name}_adapter_list", _adapter_list(config, block, uses, width, width, **kw))

    @staticmethod
    def mask_key(config, layer_idx: int):
        return None  # global attention

    def project(self, x):
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.adapted:
            q = q + _adapter(self.linear_q_adapter_list, self.use, x)
            k = k + _adapter(self.linear_k_adapter_list, self.use, x)
            v = v + _adapter(self.linear_v_adapter_list, self.use, x)
        return (q.reshape(b, s, self.num_heads, self.head_dim), k.reshape(b, s, self.num_kv_heads, self.head_dim),
                v.reshape(b, s, self.num_kv_heads, self.head_dim))


class Zamba2MLP(nnx.Module):
    """``down_proj(act(gate) * up)`` of ``gate_up_proj`` plus the use's adapter."""

    def __init__(self, config, block: int, use: int, uses: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"zamba2: hidden_act {config.hidden_act!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, i, bias = config.hidden_size, config.intermediate_size, bool(config.add_bias_linear)
        self.gate_up_proj = nnx.Linear(h, 2 * i, use_bias=bias, **kw)
        self.down_proj = nnx.Linear(i, h, use_bias=bias, **kw)
        self.gate_up_proj_adapter_list = _adapter_list(config, block, uses, h, 2 * i, **kw)
        self.use, self.act = use, config.hidden_act

    def __call__(self, x):
        gate_up = self.gate_up_proj(x) + _adapter(self.gate_up_proj_adapter_list, self.use, x)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return self.down_proj(ACTIVATIONS[self.act](gate) * up)


class Zamba2AttentionDecoderLayer(nnx.Module):
    """``shared_transformer``: norm, attention, norm, MLP over the layer input and the embeddings."""

    def __init__(self, config, block: int, use: int, uses: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Zamba2Attention(config, block, use, uses, **kw)
        self.feed_forward = Zamba2MLP(config, block, use, uses, **kw)
        self.input_layernorm = RMSNorm(config.attention_hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, embeddings, cos, sin, mask, cache=None, cache_index=None, dropout_rng=None):
        h = self.input_layernorm(jnp.concatenate([x, embeddings], axis=-1))
        a, cache = self.self_attn(h, cos, sin, {None: mask}, cache, cache_index, None, dropout_rng)
        return self.feed_forward(self.pre_ff_layernorm(a)), cache


class Zamba2MambaDecoderLayer(nnx.Module):
    """``mamba`` after ``input_layernorm``, added to the input (which a hybrid layer's transformer
    output joins before the norm only)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mamba = Mamba2Mixer(config, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, embeddings, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None, transformer_out=None):
        h = x if transformer_out is None else x + transformer_out
        out, cache = self.mamba(self.input_layernorm(h), token_mask, cache, segment_ids)
        return x + out, cache


class Zamba2HybridLayer(nnx.Module):
    """``shared_transformer``, ``linear``, then ``mamba_decoder``. Its cache: the Mamba-2 state and
    the attention's ``{"k", "v"}`` in one dict."""

    def __init__(self, config, block: int, use: int, uses: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared_transformer = Zamba2AttentionDecoderLayer(config, block, use, uses, **kw)
        self.linear = nnx.Linear(config.hidden_size, config.hidden_size, use_bias=False, **kw)
        self.mamba_decoder = Zamba2MambaDecoderLayer(config, **kw)

    def __call__(self, x, embeddings, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        t, kv = self.shared_transformer(x, embeddings, cos, sin, mask, kv, cache_index, dropout_rng)
        state = None if cache is None else {"conv": cache["conv"], "ssm": cache["ssm"]}
        x, state = self.mamba_decoder(x, embeddings, cos, sin, mask, token_mask, state, cache_index, None,
                                      segment_ids, transformer_out=self.linear(t))
        return x, None if cache is None else {**kv, **state}


def _tie(target: nnx.Module, source: nnx.Module) -> None:
    """Makes every weight of ``target`` the same ``nnx.Param`` object as ``source``'s at its path."""
    sources = dict(iter_modules(source))
    for path, module in iter_modules(target):
        twin = sources[path]
        for name, value in list(vars(module).items()):
            if isinstance(value, nnx.Param):
                setattr(module, name, getattr(twin, name))


class Zamba2Layer:
    """Layer ``i`` of the stack, as transformers builds it: a :class:`Zamba2HybridLayer` running block
    ``use % num_mem_blocks`` (``use``: its rank among the hybrid layers) or a Mamba-2 layer."""

    def __new__(cls, config, i: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kinds = zamba2_layer_types(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if kinds[i] != "hybrid":
            return Zamba2MambaDecoderLayer(config, **kw)
        use = kinds[:i].count("hybrid")
        return Zamba2HybridLayer(config, use % config.num_mem_blocks, use, kinds.count("hybrid"), **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return False


class Zamba2Model(HybridDecoder):
    """``embed_tokens``, ``layers`` (Mamba-2 and hybrid), ``final_layernorm``; the later hybrid
    layers' ``shared_transformer`` weights are their block's first holder's."""

    layer_class: ClassVar[type] = Zamba2Layer
    norm_name: ClassVar[str] = "final_layernorm"
    recurrent: ClassVar[str] = "Mamba-2"

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kinds = zamba2_layer_types(config)
        if len(kinds) != config.num_hidden_layers:
            raise ValueError(f"zamba2: layers_block_type has {len(kinds)} entries for num_hidden_layers="
                             f"{config.num_hidden_layers}")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        holders, tied = [], []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Zamba2HybridLayer):
                block = layer.shared_transformer.self_attn.use % config.num_mem_blocks
                if len(holders) < config.num_mem_blocks:
                    holders.append(layer.shared_transformer)
                else:
                    _tie(layer.shared_transformer, holders[block])
                    tied.append(f"layers.{i}.shared_transformer.")
        # the checkpoint keys under these are their block's first holder's (static: part of the graph definition)
        self.tied_prefixes = tuple(tied)

    @staticmethod
    def make_rotary(config):
        return rotary_embedding(config, config.attention_head_dim) if config.use_mem_rope else None

    @staticmethod
    def layer_types(config) -> list[str]:
        return zamba2_layer_types(config)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, output_router_logits: bool = False,
                 segment_ids=None) -> ModelOutput:
        """As :meth:`HybridDecoder.__call__`; each layer also reads the word embeddings."""
        x, attention_mask, segment_ids, pos, mask, token_mask, cos, sin = hybrid_inputs(
            self, input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv, segment_ids,
            recurrent=self.recurrent)
        embeddings = x

        def step(layer, h, layer_cache=None, start=None, key=None):
            return layer(h, embeddings, cos, sin, mask, token_mask, layer_cache, start, key, segment_ids)

        new_cache = None
        if cache is None:
            x = run_layers(self.layers, lambda layer, h, k: step(layer, h, key=k)[0], x, self.remat, dropout_rng)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = step(layer, x, cache[i], pos.start, layer_key(dropout_rng, i))
                new_cache.append(layer_cache)
        return ModelOutput(last_hidden_state=self.final_layernorm(x), past_key_values=new_cache)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, Mamba-2's ``{"conv", "ssm"}``, and a hybrid layer's
    attention ``{"k", "v"}`` (``[batch, max_len, kv heads, head_dim]``) beside it."""
    kv = (batch, max_len, config.num_key_value_heads, config.attention_head_dim)
    return [{**mamba_cache(config, batch, dtype), **({"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype)}
                                                     if kind == "hybrid" else {})}
            for kind in zamba2_layer_types(config)]


class _SharedBlocks:
    """Checkpoints without the tied blocks' keys (as transformers writes them), and no merge into them."""

    def _tied(self, key: str) -> bool:
        prefix = f"{self.base_model_prefix}."
        inner = key[len(prefix):] if key.startswith(prefix) else key
        return inner.startswith(self.model.tied_prefixes) or super()._tied(key)

    def checkpoint_layout(self, state):
        return {k: v for k, v in super().checkpoint_layout(state).items() if not self._tied(k)}


class Zamba2ForCausalLM(_SharedBlocks, LlamaForCausalLM):
    """Zamba2's causal LM: ``model`` and ``lm_head`` (tied to the embeddings by default)."""

    model_class: ClassVar[type[nnx.Module]] = Zamba2Model

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv``."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


class Zamba2ForSequenceClassification(_SharedBlocks, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Zamba2Model


register(Zamba2ForCausalLM, model_types=("zamba2",), default=True)
register(Zamba2ForSequenceClassification)
