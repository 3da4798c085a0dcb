"""Decoders whose layers differ only in what they are given: their mask and their RoPE.

Gemma 2/3 alternate sliding and global layers (Gemma 3 with a RoPE base each), OLMo 3 too, and
SmolLM3 leaves RoPE out of every fourth layer. Each layer has a *kind*; the decoder computes each
kind's ``(cos, sin, mask)`` once per call and hands layer ``i`` its kind's. The layers themselves
are alike, so ``scan_layers=True`` stacks them all: the scanned step reads layer ``i``'s entries
from the per-kind tables stacked along a new axis, by index.

A layer without RoPE gets ``cos = 1`` and ``sin = 0``: the rotation is the identity, exactly.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._llama import LlamaModel, kv_layout
from peftjax.models._outputs import ModelOutput
from peftjax.models._rope import RotaryEmbedding, rotary_embedding
from peftjax.nn._dropout import layer_key
from peftjax.nn._scan import StackedLayers, run_layers

# (kind, its RoPE or None for none, its window or None for full causal attention)
Kind = tuple[str, RotaryEmbedding | None, int | None]
LAYER_TYPES = ("full_attention", "sliding_attention")


def checked_layer_types(config, supported: Sequence[str] = LAYER_TYPES) -> tuple[str, ...]:
    """``config.layer_types`` (each layer's type), checked.

    Raises:
      ValueError: a type not in ``supported``, or a list whose length is not ``num_hidden_layers``.
    """
    found = tuple(config.layer_types)
    unknown = sorted(set(found) - set(supported))
    if unknown:
        raise ValueError(f"{config.model_type}: layer_types {unknown} are not supported; "
                         f"supported: {list(supported)}")
    if len(found) != config.num_hidden_layers:
        raise ValueError(f"{config.model_type}: layer_types has {len(found)} entries for "
                         f"num_hidden_layers={config.num_hidden_layers}")
    return found


def rope_parameters_by_type(config, default_theta: Mapping[str, float], legacy_theta: Mapping[str, str],
                            scaled: tuple[str, ...] = ("full_attention",)) -> dict[str, dict]:
    """``{layer type: RoPE parameters}`` as transformers' configs with a RoPE per layer type settle
    them (Gemma 3's, OLMo 3's, ModernBERT's): transformers 5's per-type ``rope_parameters``;
    transformers 4's ``rope_scaling`` for the ``scaled`` types (the global layers; ModernBERT's
    both); a type's base from its ``legacy_theta`` field where the parameters give none, else
    ``default_theta``.

    Raises:
      ValueError: ``rope_parameters`` not keyed by layer type.
    """
    given = getattr(config, "rope_parameters", None)
    if given and not set(given) <= set(LAYER_TYPES):
        raise ValueError(f"{config.model_type}: rope_parameters must map layer types {list(LAYER_TYPES)} to RoPE "
                         f"settings; found keys {sorted(given)}")
    params = {t: dict((given or {}).get(t) or {"rope_type": "default"}) for t in LAYER_TYPES}
    scaling = getattr(config, "rope_scaling", None)
    for t in scaled if scaling else ():
        params[t].update(scaling)
    for t, p in params.items():
        theta = getattr(config, legacy_theta[t], None) if t in legacy_theta else None
        p.setdefault("rope_theta", default_theta[t] if theta is None else theta)
    return params


def rotary_of(config, params: dict, head_dim: int) -> RotaryEmbedding:
    """The RoPE of one layer type's ``params`` (see :func:`rope_parameters_by_type`)."""
    view = types.SimpleNamespace(rope_parameters=params, max_position_embeddings=config.max_position_embeddings,
                                 model_type=config.model_type)
    return rotary_embedding(view, head_dim)


def kinds_by_type(layer_types: Sequence[str], rope_for: Callable[[str], RotaryEmbedding],
                  window: int | None) -> tuple[Kind, ...]:
    """The kinds of decoders whose kind is the layer type: each type's RoPE, and ``window`` for
    the sliding one."""
    return tuple((t, rope_for(t), window if t == "sliding_attention" else None) for t in sorted(set(layer_types)))


def with_one_mask(layer, x, cos, sin, mask, *rest):
    """``call`` for Llama-style layers (their attention looks its mask up by window): the layer's
    own mask under the window ``None``, which such a decoder gives every attention."""
    return layer(x, cos, sin, {None: mask}, *rest)


def kind_inputs(kinds: Sequence[Kind], rope: RotaryEmbedding, pos, dtype) -> dict[str, tuple]:
    """``{kind: (cos, sin, mask)}`` for one call; ``rope`` shapes the identity of kinds without one."""
    out, cached = {}, {}
    for name, kind_rope, window in kinds:
        key = kind_rope or rope
        if key not in cached:
            cached[key] = key.cos_sin(pos.position_ids, dtype)
        cos, sin = cached[key]
        if kind_rope is None:
            cos, sin = jnp.ones_like(cos), jnp.zeros_like(sin)
        out[name] = (cos, sin, attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True, window=window))
    return out


def run_layer_kinds(layers, layer_kinds: Sequence[str], per_kind: dict[str, tuple], x: jax.Array, *, remat: str,
                    cache=None, start=None, prefix_kv=None, dropout_rng=None,
                    call: Callable | None = None) -> tuple[jax.Array, list | None]:
    """Runs ``layers``, layer ``i`` on ``per_kind[layer_kinds[i]]``; returns ``(x, new cache)``.

    ``call(layer, x, cos, sin, mask, cache, start, prefix, key)`` runs one layer (default: the
    layer itself with those arguments). Training and scoring calls (no cache, no prefix) scan a
    stacked model and honour ``remat``; the others loop.
    """
    call = call or (lambda layer, *args: layer(*args))
    if cache is None and prefix_kv is None and (isinstance(layers, StackedLayers) or remat != "none"):
        names = sorted(per_kind)
        tables = [jnp.stack(parts) for parts in zip(*(per_kind[n] for n in names))]
        index = jnp.asarray([names.index(k) for k in layer_kinds], jnp.int32)

        def step(layer, carry, key):
            h, i = carry
            cos, sin, mask = (table[index[i]] for table in tables)
            return call(layer, h, cos, sin, mask, None, None, None, key)[0], i + 1

        x, _ = run_layers(layers, step, (x, jnp.zeros((), jnp.int32)), remat, dropout_rng)
        return x, None
    new_cache = [] if cache is not None else None
    for i, layer in enumerate(layers):
        prefix = None if prefix_kv is None else prefix_kv[i]
        x, layer_cache = call(layer, x, *per_kind[layer_kinds[i]], None if cache is None else cache[i], start, prefix,
                              layer_key(dropout_rng, i))
        if cache is not None:
            new_cache.append(layer_cache)
    return x, new_cache


def decoder_call(model, x, attention_mask, position_ids, cache, cache_index, prefix_kv, dropout_rng,
                 kinds: Sequence[Kind], layer_kinds: Sequence[str], rope: RotaryEmbedding,
                 call: Callable | None = None, segment_ids=None) -> ModelOutput:
    """The body of a layer-kinds decoder's ``__call__`` after its embedding: positions, each kind's
    inputs, the layers, the final norm. ``model`` has ``layers``, ``final_norm``, ``remat`` and
    ``config``. ``segment_ids``: packed rows (see ``LlamaModel``), each kind's mask kept
    within each sequence (a sliding window counts slots, which within a sequence are its
    positions)."""
    b, s, _ = x.shape
    pos = attn.decoder_positions(
        b, s, attention_mask=attention_mask, position_ids=position_ids, cache=cache, cache_index=cache_index,
        prefix_kv=prefix_kv, num_layers=len(model.layers), owner=type(model).__name__,
        prefix_layout=lambda: kv_layout(model.config),
    )
    per_kind = {name: (cos, sin, attn.within_segments(mask, segment_ids))
                for name, (cos, sin, mask) in kind_inputs(kinds, rope, pos, x.dtype).items()}
    x, new_cache = run_layer_kinds(model.layers, layer_kinds, per_kind, x, remat=model.remat, cache=cache,
                                   start=pos.start, prefix_kv=prefix_kv, dropout_rng=dropout_rng, call=call)
    return ModelOutput(last_hidden_state=model.final_norm(x), past_key_values=new_cache)


class LayerKindsModel(LlamaModel):
    """A decoder whose layers each take their kind's mask and RoPE (Gemma 2/3, OLMo 3, SmolLM3):
    :meth:`layer_kinds_of` gives each layer's kind and each kind's RoPE and window; the rest is
    :class:`~peftjax.models.LlamaModel`'s. Any mix of kinds scans."""

    # how a layer takes its mask: Llama-style layers look theirs up by window (with_one_mask);
    # None: the layer takes it as it is (Gemma 2's)
    layer_call: ClassVar[Callable | None] = staticmethod(with_one_mask)

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        # static data, not state; a bad setting fails here, before any weight is built
        self.layer_kinds, self.kinds = self.layer_kinds_of(config)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def layer_kinds_of(self, config) -> tuple[tuple[str, ...], tuple[Kind, ...]]:
        """``(each layer's kind, the kinds)``."""
        raise NotImplementedError

    @staticmethod
    def check_scan(config) -> None:
        """Any mix of kinds scans: each layer reads its kind's mask and RoPE by index."""

    def make_rotary(self, config):
        """The first kind's RoPE (a kind without one takes its shapes from it), else the config's."""
        return next((rope for _, rope, _ in self.kinds if rope is not None), None) or super().make_rotary(config)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaModel` (packed rows too); each layer attends with its
        kind's mask and RoPE.

        A sliding window counts prefix entries as positions before the tokens, as transformers'
        sliding cache does with PEFT's prefix.
        """
        segment_ids, attention_mask, position_ids = self.packed_inputs(segment_ids, attention_mask, position_ids,
                                                                       cache, prefix_kv)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(jnp.asarray(input_ids))
        return decoder_call(self, jnp.asarray(inputs_embeds), attention_mask, position_ids, cache, cache_index,
                            prefix_kv, dropout_rng, self.kinds, self.layer_kinds, self.rotary, call=self.layer_call,
                            segment_ids=segment_ids)
