"""Zyphra's Zamba (v1; ``model_type`` ``"zamba"``: Zamba-7B-v1 and its phase-1 checkpoint) in Flax NNX,
under transformers' names.

A stack of Mamba layers in which the ``"hybrid"`` layers (``layers_block_type``) first run one
transformer block that every hybrid layer shares (``shared_transf``):

- the layer's input concatenated with the word embeddings (``2 x hidden``), ``input_layernorm``,
  attention over that width without positions (no RoPE; ``head_dim = 2 hidden / heads``, scores
  scaled by ``(head_dim / 2) ** -0.5``), ``o_proj`` back to the hidden size, ``pre_ff_layernorm`` and
  the gated MLP ``down_proj(act(gate_proj) * up_proj)`` (``feed_forward``), no residual adds inside;
- its output through ``linear`` is added to the layer's input before ``mamba_decoder``'s norm
  (the residual is the input alone).

The Mamba mixer has ``n_mamba_heads`` heads: ``in_proj``'s output interleaves the input and the
gate channel by channel, the causal depthwise ``conv1d`` (SiLU) runs over all channels, and each head
of ``intermediate / n_mamba_heads`` channels is an independent Mamba-1 scan with its own
``x_proj_weight [heads, rank + 2 state, head_dim]`` (time step input, ``B``, ``C``),
``dt_proj_weight [heads, head_dim, rank]``, ``dt_proj_bias``, ``A_log`` and ``D``; the heads are
concatenated into ``out_proj``. Those per-head weights are parameters, not linear layers, so LoRA
adapts ``in_proj`` and ``out_proj`` there (PEFT does the same).

Each hybrid layer has its own ``shared_transf`` module whose weights are the same ``nnx.Param``
objects as the first hybrid layer's (transformers ties them; only the first is in a checkpoint):
one array, one gradient summing every use, and an adapter per layer on them, as PEFT wraps each
layer's module. Merging an adapter into the shared block is refused by name, as for Zamba2.

Not here: prefix tuning (the Mamba layers have no keys); ``scan_layers`` (the layers differ).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._config import LEGACY_LAYER_TYPES
from peftjax.models._hybrid import HybridDecoder
from peftjax.models._lfm2 import Lfm2Conv1d
from peftjax.models._llama import LlamaForCausalLM, LlamaForSequenceClassification
from peftjax.models._zamba2 import (
    Zamba2Attention,
    Zamba2AttentionDecoderLayer,
    Zamba2HybridLayer,
    Zamba2MambaDecoderLayer,
    Zamba2Model,
    _SharedBlocks,
    _tie,
)
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._norm import RMSNorm
from peftjax.nn._selective_scan import selective_scan

LAYER_TYPES = ("linear_attention", "hybrid")


def zamba_layer_types(config) -> list[str]:
    """Each layer's kind (``layers_block_type``): a Mamba layer or a hybrid one.

    Raises:
      ValueError: another kind, a count other than ``num_hidden_layers``, or sizes the heads do not
        tile.
    """
    kinds = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in config.layers_block_type]
    unknown = sorted(set(kinds) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"zamba: layers_block_type {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(f"zamba: layers_block_type has {len(kinds)} entries for num_hidden_layers="
                         f"{config.num_hidden_layers}")
    if (config.mamba_expand * config.hidden_size) % config.n_mamba_heads:
        raise ValueError(f"zamba: n_mamba_heads ({config.n_mamba_heads}) must divide the Mamba width "
                         f"({config.mamba_expand * config.hidden_size})")
    return kinds


class ZambaMambaMixer(nnx.Module):
    """Zamba's multi-head Mamba mixer (see the module's docstring). Its cache: ``{"conv" [batch,
    kernel - 1, intermediate], "ssm" [batch, heads, head_dim, state]}`` (the state in float32)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        name: (name, False) for name in ("x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D")}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        if config.hidden_mamba_act != "silu":
            raise ValueError(f"zamba: hidden_mamba_act {config.hidden_mamba_act!r} is not supported; expected 'silu'")
        self.width = width = int(config.mamba_expand * config.hidden_size)
        self.heads, self.head_dim = config.n_mamba_heads, width // config.n_mamba_heads
        self.state_size, self.rank = config.mamba_d_state, int(config.mamba_dt_rank)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bias = bool(config.mamba_proj_bias)
        self.in_proj = nnx.Linear(config.hidden_size, 2 * width, use_bias=bias, **kw)
        self.conv1d = Lfm2Conv1d(width, config.mamba_d_conv, use_bias=bool(config.mamba_conv_bias),
                                 param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)
        std = config.initializer_range
        shape = (self.heads, self.rank + 2 * self.state_size, self.head_dim)
        self.x_proj_weight = nnx.Param((std * jax.random.normal(rngs.params(), shape)).astype(param_dtype))
        bound = self.rank ** -0.5
        self.dt_proj_weight = nnx.Param(jax.random.uniform(rngs.params(), (self.heads, self.head_dim, self.rank),
                                                           param_dtype, -bound, bound))
        self.dt_proj_bias = nnx.Param(jnp.zeros((self.heads, self.head_dim), param_dtype))
        a = jnp.broadcast_to(jnp.arange(1, self.state_size + 1, dtype=jnp.float32),
                             (self.heads, self.head_dim, self.state_size))
        self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))  # transformers' initialisation
        self.D = nnx.Param(jnp.ones((self.heads, self.head_dim), param_dtype))
        self.out_proj = nnx.Linear(width, config.hidden_size, use_bias=bias, **kw)

    def __call__(self, x, token_mask=None, cache=None, segment_ids=None):
        """``token_mask``: ``[batch, seq]``, 0 on padding (``None``: none); ``cache``: ``{"conv",
        "ssm"}`` or ``None``; ``segment_ids``: packed rows, each convolved and scanned from zeros.
        Returns ``(out, the new cache or None)``."""
        dtype = x.dtype
        b, s, _ = x.shape
        h, hd, n, r = self.heads, self.head_dim, self.state_size, self.rank
        mask = None if token_mask is None else token_mask[..., None].astype(dtype)
        if mask is not None:
            x = x * mask
        both = self.in_proj(x).reshape(b, s, self.width, 2)  # transformers' view(batch, -1, 2, seq): interleaved
        hidden, gate = both[..., 0], both[..., 1]
        hidden, conv_state = self.conv1d(hidden, None if cache is None else cache["conv"], segment_ids)
        hidden = jax.nn.silu(hidden)
        if mask is not None:
            hidden = hidden * mask
        per_head = hidden.reshape(b, s, h, hd)
        params = jnp.einsum("bthd,hkd->bthk", per_head, self.x_proj_weight.get_value().astype(hidden.dtype))
        step, B, C = jnp.split(params, [r, r + n], axis=-1)
        step = jnp.einsum("bthr,hdr->bthd", step, self.dt_proj_weight.get_value().astype(step.dtype))
        dt = jax.nn.softplus(step.astype(jnp.float32) + self.dt_proj_bias.get_value().astype(jnp.float32)[None, None])
        A = -jnp.exp(self.A_log.get_value().astype(jnp.float32))
        state = None if cache is None else cache["ssm"]
        scan = jax.vmap(lambda u, d, a, bb, cc, st: selective_scan(u, d, a, bb, cc, st, segment_ids),
                        in_axes=(2, 2, 0, 2, 2, None if state is None else 1), out_axes=(2, 1))
        y, new_state = scan(per_head, dt, A, B, C, state)
        y = y + self.D.get_value().astype(jnp.float32)[None, None] * per_head.astype(jnp.float32)
        y = y.reshape(b, s, self.width) * jax.nn.silu(gate.astype(jnp.float32))
        out = self.out_proj(y.astype(dtype))
        new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype), "ssm": new_state}
        return out, new_cache


class ZambaAttention(Zamba2Attention):
    """Attention over the ``2 x hidden`` concatenation, without positions (Zamba2's without its
    per-use adapters)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, 0)
        self.scale = (self.head_dim / 2) ** -0.5
        self.use, self.adapted = 0, False
        width = config.attention_hidden_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(width, self.num_heads * self.head_dim, **kw)
        self.k_proj = nnx.Linear(width, self.num_kv_heads * self.head_dim, **kw)
        self.v_proj = nnx.Linear(width, self.num_kv_heads * self.head_dim, **kw)
        self.o_proj = nnx.Linear(self.num_heads * self.head_dim, config.hidden_size, **kw)


class ZambaMLP(nnx.Module):
    """``feed_forward``: ``down_proj(act(gate_proj) * up_proj)``, no biases."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"zamba: hidden_act {config.hidden_act!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = nnx.Linear(h, i, **kw), nnx.Linear(h, i, **kw), \
            nnx.Linear(i, h, **kw)
        self.act = config.hidden_act

    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class ZambaAttentionDecoderLayer(Zamba2AttentionDecoderLayer):
    """``shared_transf``: norm, attention, norm, MLP over the layer input and the embeddings."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = ZambaAttention(config, **kw)
        self.feed_forward = ZambaMLP(config, **kw)
        self.input_layernorm = RMSNorm(config.attention_hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)


class ZambaMambaDecoderLayer(Zamba2MambaDecoderLayer):
    """``mamba`` after ``input_layernorm``, added to the input (a hybrid layer's transformer output
    joins the input before the norm only)."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mamba = ZambaMambaMixer(config, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)


class ZambaHybridLayer(Zamba2HybridLayer):
    """``shared_transf``, ``linear``, then ``mamba_decoder``. Its cache: the Mamba state and the
    attention's ``{"k", "v"}`` in one dict."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared_transf = ZambaAttentionDecoderLayer(config, **kw)
        self.linear = nnx.Linear(config.hidden_size, config.hidden_size, use_bias=False, **kw)
        self.mamba_decoder = ZambaMambaDecoderLayer(config, **kw)

    @property
    def shared_transformer(self):  # what Zamba2HybridLayer.__call__ runs
        return self.shared_transf


class ZambaLayer:
    """Layer ``i`` of the stack, as transformers builds it: hybrid or Mamba."""

    def __new__(cls, config, i: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if zamba_layer_types(config)[i] == "hybrid":
            return ZambaHybridLayer(config, **kw)
        return ZambaMambaDecoderLayer(config, **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return False


class ZambaModel(Zamba2Model):
    """``embed_tokens``, ``layers`` (Mamba and hybrid), ``final_layernorm``; every hybrid layer's
    ``shared_transf`` weights are the first one's."""

    layer_class: ClassVar[type] = ZambaLayer
    recurrent: ClassVar[str] = "Mamba"

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        zamba_layer_types(config)
        HybridDecoder.__init__(self, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hybrid = [i for i, layer in enumerate(self.layers) if isinstance(layer, ZambaHybridLayer)]
        for i in hybrid[1:]:
            _tie(self.layers[i].shared_transf, self.layers[hybrid[0]].shared_transf)
        # the checkpoint keys under these are the first hybrid layer's (static: part of the graph definition)
        self.tied_prefixes = tuple(f"layers.{i}.shared_transf." for i in hybrid[1:])

    @staticmethod
    def make_rotary(config):
        return None

    @staticmethod
    def layer_types(config) -> list[str]:
        return zamba_layer_types(config)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, the Mamba ``{"conv", "ssm"}``, and a hybrid layer's
    attention ``{"k", "v"}`` (``[batch, max_len, kv heads, head_dim]``) beside it."""
    width = int(config.mamba_expand * config.hidden_size)
    heads = config.n_mamba_heads
    mamba = lambda: {"conv": jnp.zeros((batch, config.mamba_d_conv - 1, width), dtype),  # noqa: E731
                     "ssm": jnp.zeros((batch, heads, width // heads, config.mamba_d_state), np.float32)}
    kv = (batch, max_len, config.num_key_value_heads, config.attention_head_dim)
    return [{**mamba(), **({"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype)} if kind == "hybrid" else {})}
            for kind in zamba_layer_types(config)]


class ZambaForCausalLM(_SharedBlocks, LlamaForCausalLM):
    """Zamba's causal LM: ``model`` and ``lm_head`` (tied to the embeddings by default)."""

    model_class: ClassVar[type[nnx.Module]] = ZambaModel

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None):
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv``."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


class ZambaForSequenceClassification(_SharedBlocks, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = ZambaModel


register(ZambaForCausalLM, model_types=("zamba",), default=True)
register(ZambaForSequenceClassification)
