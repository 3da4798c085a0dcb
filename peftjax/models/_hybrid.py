"""What the hybrid decoders share (Qwen3.5's and Qwen3-Next's linear attention, LFM2's short
convolutions, the Mamba layers of Granite 4.0, Nemotron-H, Bamba, Jamba, Falcon-H1 and the Mamba
LMs): recurrent layers with no keys to prefix, a padding mask those layers zero their input with
(transformers' ``apply_mask_to_padding_states``), caches in which only the attention layers know
the slots, and the stack (:class:`HybridDecoder`) that runs such layers, with or without experts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._llama import LlamaModel, head_dim_of
from peftjax.models._mixtral import _token_mask, expert_count, load_balancing_loss, routing_statistics
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import rotary_embedding
from peftjax.nn._dropout import layer_key
from peftjax.nn._norm import RMSNorm
from peftjax.nn._scan import run_layers


class HybridInputs(NamedTuple):
    """A hybrid decoder call's inputs, settled: ``x`` (the embeddings), ``attention_mask`` (the
    cache's slots where a cache is given without one), ``segment_ids``, the positions ``pos``, the
    attention layers' ``mask`` and ``cos``/``sin``, and the recurrent layers' ``token_mask``
    (``[batch, seq]``, 0 on padding; ``None`` for one decoded token, never padding). ``cos`` and ``sin``
    are ``None`` in a decoder without RoPE (``model.rotary`` ``None``)."""

    x: jax.Array
    attention_mask: jax.Array | None
    segment_ids: jax.Array | None
    pos: attn.DecoderPositions
    mask: jax.Array
    token_mask: jax.Array | None
    cos: jax.Array | None
    sin: jax.Array | None


def hybrid_inputs(model, input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                  segment_ids, *, recurrent: str) -> HybridInputs:
    """The inputs of ``model`` (a ``LlamaModel`` of hybrid layers) for one call.

    Raises:
      ValueError: ``prefix_kv`` given (``recurrent`` names the layers that have no keys to prefix).
    """
    if prefix_kv is not None:
        raise ValueError(f"{type(model).__name__}: prefix_kv is not supported: the {recurrent} layers have no keys "
                         "and values to prepend a prefix to")
    segment_ids, attention_mask, position_ids = model.packed_inputs(segment_ids, attention_mask, position_ids, cache,
                                                                    None)
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(jnp.asarray(input_ids))
    x = jnp.asarray(inputs_embeds)
    b, s, _ = x.shape
    if attention_mask is None and cache is not None:
        attention_mask = jnp.ones((b, cache_length(cache, s)), jnp.int32)
    pos = attn.decoder_positions(
        b, s, attention_mask=attention_mask, position_ids=position_ids, cache=None, cache_index=cache_index,
        prefix_kv=None, num_layers=len(model.layers), owner=type(model).__name__, prefix_layout=lambda: (0, 0),
    )
    mask = attn.within_segments(attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True), segment_ids)
    token_mask = None
    if attention_mask is not None and s > 1:  # a decoded token is never padding (transformers' rule too)
        token_mask = jax.lax.dynamic_slice_in_dim(jnp.asarray(attention_mask), pos.start, s, axis=1)
    cos, sin = (None, None) if model.rotary is None else model.rotary.cos_sin(pos.position_ids, x.dtype)
    return HybridInputs(x, attention_mask, segment_ids, pos, mask, token_mask, cos, sin)


def cache_length(cache, default: int) -> int:
    """The slots of the attention layers' caches (``default`` where no layer attends)."""
    return next((c["k"].shape[1] for c in cache if "k" in c), default)


def hybrid_cache(config, layer_types: Sequence[str], batch: int, max_len: int, dtype,
                 recurrent: Callable[..., dict[str, jax.Array]]) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, ``{"k", "v"}`` (``[batch, max_len, kv_heads,
    head_dim]``) where its type is ``full_attention``, ``recurrent(config, batch, dtype)`` where it
    is ``linear_attention``, and ``{}`` for a layer that caches nothing (an MLP)."""
    kv = (batch, max_len, config.num_key_value_heads or config.num_attention_heads, head_dim_of(config))
    return [{"k": jnp.zeros(kv, dtype), "v": jnp.zeros(kv, dtype)} if t == "full_attention"
            else recurrent(config, batch, dtype) if t == "linear_attention" else {} for t in layer_types]


class HybridDecoder(LlamaModel):
    """A decoder stack of recurrent and attention layers, perhaps with experts: ``embed_tokens``,
    ``layers``, a final RMSNorm (``norm`` unless the family names it otherwise).

    Each layer is called ``layer(x, cos, sin, mask, token_mask, cache, cache_index, dropout_rng,
    segment_ids)`` and returns ``(x, cache, router logits or None)``; a layer class says which
    layers route through experts (``is_sparse``). A family gives its layers' kinds
    (:meth:`layer_types`, which ``scan_layers=True`` needs alike) and names what its recurrent
    layers are (``recurrent``, for the prefix refusal).
    """

    recurrent: ClassVar[str] = "recurrent"

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.sparse_layers = sum(self.layer_class.is_sparse(config, i) for i in range(config.num_hidden_layers))

    @staticmethod
    def layer_types(config) -> Sequence[str]:
        """Each layer's kind (what must be alike to scan)."""
        raise NotImplementedError

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        return RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    @staticmethod
    def make_rotary(config):
        return rotary_embedding(config, head_dim_of(config))

    @classmethod
    def check_scan(cls, config) -> None:
        """Refuses ``scan_layers=True`` where the layers' kinds mix."""
        kinds = list(cls.layer_types(config))
        if len(set(kinds)) > 1:
            raise ValueError(f"scan_layers=True needs alike layers; {config.model_type}'s layer_types mix "
                             f"{sorted(set(kinds))}")

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, output_router_logits: bool = False,
                 segment_ids=None) -> ModelOutput:
        """Runs the decoder. With ``cache`` (the family's ``init_cache``), ``attention_mask``
        covers the cache's slots and the call's tokens sit at ``cache_index``; ``dropout_rng``: a
        key to apply the attention dropout (training); ``None``: none. ``segment_ids``: packed rows
        (see ``LlamaModel``): each sequence attends to itself, and its recurrent layers'
        convolutions and states start from zeros, as it would alone.

        With experts, ``aux_loss`` is the load-balancing loss over the sparse layers (``None`` with
        a cache), and ``output_router_logits`` adds ``router_logits``, one ``[batch * seq,
        experts]`` array per sparse layer, as transformers records them.

        Raises:
          ValueError: ``prefix_kv`` given (the recurrent layers have no keys to prefix).
        """
        x, attention_mask, segment_ids, pos, mask, token_mask, cos, sin = hybrid_inputs(
            self, input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv, segment_ids,
            recurrent=self.recurrent)
        b, s, _ = x.shape
        # a mixture of experts' routing: the load-balancing loss's sums and, if asked, each layer's logits
        routing = None
        if self.sparse_layers:
            experts = expert_count(self.config)
            zeros = jnp.zeros((experts,), jnp.float32)
            logits_buffer = jnp.zeros((self.sparse_layers, b * s, experts), x.dtype) if output_router_logits else None
            routing = (zeros, zeros, jnp.zeros((), jnp.int32), logits_buffer)
            routed = _token_mask(attention_mask, b, s)

        def step(layer, carry, layer_cache=None, start=None, key=None):
            h, routing = carry
            h, layer_cache, logits = layer(h, cos, sin, mask, token_mask, layer_cache, start, key, segment_ids)
            if logits is not None:
                counts, probs, n, buffer = routing
                c, p = routing_statistics(logits, self.config.num_experts_per_tok, routed)
                if buffer is not None:
                    buffer = buffer.at[n].set(logits.astype(buffer.dtype))
                routing = (counts + c, probs + p, n + 1, buffer)
            return (h, routing), layer_cache

        new_cache = None
        if cache is None:  # training and scoring: rematerialised where asked
            x, routing = run_layers(self.layers, lambda layer, c, k: step(layer, c, key=k)[0], (x, routing),
                                    self.remat, dropout_rng)
        else:
            new_cache = []
            for i, layer in enumerate(self.layers):
                (x, routing), layer_cache = step(layer, (x, routing), cache[i], pos.start, layer_key(dropout_rng, i))
                new_cache.append(layer_cache)
        aux = router_logits = None
        if routing is not None:
            counts, probs, _, buffer = routing
            if cache is None:
                aux = load_balancing_loss(counts, probs, jnp.sum(routed) * self.sparse_layers)
            router_logits = None if buffer is None else tuple(buffer)
        return ModelOutput(last_hidden_state=self.final_norm(x), past_key_values=new_cache, aux_loss=aux,
                           router_logits=router_logits)


