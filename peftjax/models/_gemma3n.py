"""Gemma 3n's text decoder (``model_type`` ``"gemma3n_text"``) in Flax NNX, under transformers' names.

Gemma 3n shares Gemma 4's attention (``_gemma4``: q/k norms, a weightless v norm, unscaled scores,
the last ``num_kv_shared_layers`` layers reading the keys and values of the last earlier layer of
their type) and its per-layer embeddings. What is its own, as transformers 5's
``Gemma3nForCausalLM`` computes it:

- **AltUp**: the residual stream is ``altup_num_inputs`` streams. The embeddings make the first; the
  others are ``altup_projections`` of it, rescaled to its root mean square. Each layer first
  *predicts* every stream as a mix of all of them (``prediction_coefs`` of a router on the active
  stream: ``tanh(modality_router(router_norm(x) / hidden_size))``), runs on the active prediction
  only, then *corrects* every stream by the layer's innovation (its output minus the active
  prediction) times ``correction_coefs + 1``. The corrected active stream, scaled by
  ``correct_output_scale`` and gated with the layer's per-layer input, is added to the other
  streams. At the end ``altup_unembed_projections`` bring the other streams back (rescaled to the
  first's root mean square) and the streams are averaged.
- **LAuReL**: beside attention, ``linear_right(linear_left(x))`` normed (``post_laurel_norm``)
  and added to ``x``; the attention's residual and it are averaged by ``1/sqrt(2)``.
- **Activation sparsity**: where ``activation_sparsity_pattern`` gives a layer a target ``p``, its
  MLP keeps the gate's values above ``mean + std * Phi^-1(p)`` over the hidden features (minus that
  cutoff, the rest zero) before the GELU.
- the MLP's width may differ by layer (``intermediate_size`` a list).
- token ids beyond ``vocab_size_per_layer_input`` (the multimodal tokens) read the per-layer
  table's row 0.

Not implemented: transformers clamps ``prediction_coefs`` and ``correction_coefs`` to
``altup_coef_clip`` in training mode (and then computes the correction from the base weight
alone, so PEFT's LoRA on ``correction_coefs`` acts only in evaluation); peftjax computes every call
as transformers' evaluation does, which is the same while the coefficients are inside the clip (a
checkpoint's are; peftjax trains adapters, not them). ``scan_layers=True`` is refused (the layers'
widths and roles differ), as are prefix adapters and virtual tokens (no ids for the per-layer
embeddings), as for Gemma 4. transformers' embedding tables take no gradient in their padding row
(row 0, which the ids beyond the per-layer table read); peftjax's do, as for its other families (it
shows only when a table itself trains, on such tokens). ``Gemma3nForConditionalGeneration``
checkpoints (the Hub's, with vision and audio towers) are read for their text model.
"""

from __future__ import annotations

import math
import statistics
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._gemma2 import GELU_APPROXIMATE, ScaledEmbed
from peftjax.models._gemma3 import gemma3_rope_parameters
from peftjax.models._gemma4 import (
    Gemma4ForCausalLM,
    Gemma4TextAttention,
    _gelu,
    embeddings_with_ids,
    inputs_by_layer_type,
    kv_sharing_modes,
    per_layer_inputs,
    run_sharing_layers,
)
from peftjax.models._layer_kinds import LAYER_TYPES, rotary_of
from peftjax.models._llama import LlamaModel
from peftjax.models._modeling import ConfigRef
from peftjax.models._outputs import ModelOutput
from peftjax.nn._norm import RMSNorm
from peftjax.nn._param_reader import ParamReader
from peftjax.nn._scan import check_remat


def check_gemma3n_config(config) -> None:
    """Refuses what this implementation does not do, naming the option.

    Raises:
      ValueError: an unknown ``hidden_activation``, layer type or RoPE type; ``intermediate_size``
        or ``activation_sparsity_pattern`` not one per layer; ``altup_active_idx`` outside the
        streams; every layer sharing keys; ``scan_layers=True``.
    """
    name = config.model_type
    if config.hidden_activation not in GELU_APPROXIMATE:
        raise ValueError(f"{name}: hidden_activation {config.hidden_activation!r} is not supported; supported: "
                         f"{sorted(GELU_APPROXIMATE)}")
    n, types = config.num_hidden_layers, list(config.layer_types)
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"{name}: layer_types {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    for field in ("layer_types", "intermediate_size", "activation_sparsity_pattern"):
        if len(getattr(config, field)) != n:
            raise ValueError(f"{name}: {field} has {len(getattr(config, field))} entries for num_hidden_layers={n}")
    if not 0 <= config.altup_active_idx < config.altup_num_inputs:
        raise ValueError(f"{name}: altup_active_idx={config.altup_active_idx} must index one of the "
                         f"altup_num_inputs={config.altup_num_inputs} streams")
    for params in gemma3_rope_parameters(config).values():
        rotary_of(config, params, config.head_dim)  # refuses a RoPE type it does not compute
    shared = int(config.num_kv_shared_layers or 0)
    if not 0 <= shared < n:
        raise ValueError(f"{name}: num_kv_shared_layers={shared} must leave a layer with its own keys "
                         f"(num_hidden_layers={n})")
    kv_sharing_modes(config)
    if getattr(config, "scan_layers", False):
        raise ValueError(f"{name}: scan_layers=True is not supported (the layers' widths and roles differ)")


def rms_rescaled(x: jax.Array, target: jax.Array) -> jax.Array:
    """``x`` rescaled to the root mean square ``target`` (its own floored at ``sqrt(1e-5)``)."""
    own = jnp.sqrt(jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True), 1e-5))
    return x * target / own


def sqrt_zero_safe(x: jax.Array) -> jax.Array:
    """``sqrt(x)`` whose gradient is zero (not NaN) where ``x`` is zero. A padded token whose
    embedding is the zero row keeps zero streams and a constant MLP gate (whose standard deviation is
    zero): ``sqrt``'s infinite derivative there times a zero cotangent would make every adapter's
    gradient NaN, as it does in transformers' training."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def root_mean_square(x: jax.Array) -> jax.Array:
    return sqrt_zero_safe(jnp.mean(x * x, axis=-1, keepdims=True))


class Gemma3nTextAltUp(ParamReader, nnx.Module):
    """``altup``: ``modality_router`` after ``router_norm``, ``prediction_coefs``,
    ``correction_coefs`` and ``correct_output_scale [hidden]``."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"correct_output_scale": ("correct_output_scale", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, n = config.hidden_size, config.altup_num_inputs
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.correct_output_scale = nnx.Param(jnp.zeros((h,), param_dtype))
        self.correction_coefs = nnx.Linear(n, n, **kw)
        self.prediction_coefs = nnx.Linear(n, n * n, **kw)
        self.modality_router = nnx.Linear(h, n, **kw)
        self.router_norm = RMSNorm(h, epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.streams, self.active, self.router_scale = n, int(config.altup_active_idx), 1.0 / h

    def modalities(self, x):
        routed = self.modality_router(self.router_norm(x) * jnp.asarray(self.router_scale, x.dtype))
        return jnp.tanh(routed.astype(jnp.float32)).astype(x.dtype)

    def predict(self, streams):
        """``streams [n, b, s, h]``: each stream plus a mix of all, the mix per token."""
        n = self.streams
        coefs = self.prediction_coefs(self.modalities(streams[self.active]))
        coefs = coefs.reshape(*coefs.shape[:-1], n, n)  # [b, s, to, from]
        return jnp.einsum("bskm,mbsh->kbsh", coefs, streams) + streams

    def correct(self, predictions, activated):
        """Every stream moved by the layer's innovation on the active one, times its coefficient + 1."""
        coefs = self.correction_coefs(self.modalities(activated)) + 1.0  # [b, s, n]
        innovation = activated - predictions[self.active]
        return predictions + jnp.moveaxis(coefs, -1, 0)[..., None] * innovation[None]

    def scale_corrected_output(self, x):
        return x * self.param_value("correct_output_scale").astype(x.dtype)[None, None, :]


class Gemma3nTextLaurelBlock(nnx.Module):
    """``laurel``: ``x + post_laurel_norm(linear_right(linear_left(x)))``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, r = config.hidden_size, config.laurel_rank
        self.linear_left = nnx.Linear(h, r, **kw)
        self.linear_right = nnx.Linear(r, h, **kw)
        self.post_laurel_norm = RMSNorm(h, epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                        rngs=rngs)

    def __call__(self, x):
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class Gemma3nTextMLP(nnx.Module):
    """GeGLU of this layer's width; with a sparsity target, the gate cut at its Gaussian quantile."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, i = config.hidden_size, int(config.intermediate_size[layer_idx])
        self.gate_proj = nnx.Linear(h, i, **kw)
        self.up_proj = nnx.Linear(h, i, **kw)
        self.down_proj = nnx.Linear(i, h, **kw)
        self.approximate = GELU_APPROXIMATE[config.hidden_activation]
        sparsity = float(config.activation_sparsity_pattern[layer_idx])
        # torch's Normal(0, 1).icdf in float32: the standard normal quantile, rounded to float32
        self.std_multiplier = float(np.float32(statistics.NormalDist().inv_cdf(sparsity))) if sparsity > 0 else None

    def __call__(self, x):
        gate = self.gate_proj(x)
        if self.std_multiplier is not None:
            mean = jnp.mean(gate, axis=-1, keepdims=True)
            std = sqrt_zero_safe(jnp.mean(jnp.square(gate - mean), axis=-1, keepdims=True))  # unbiased=False
            cutoff = mean + std * jnp.asarray(self.std_multiplier, gate.dtype)
            gate = jax.nn.relu(gate - cutoff)
        return self.down_proj(_gelu(gate, self.approximate) * self.up_proj(x))


class Gemma3nTextDecoderLayer(nnx.Module):
    """AltUp around Gemma 4's attention, LAuReL beside it, the MLP, and the per-layer input's gate."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, p, eps = config.hidden_size, config.hidden_size_per_layer_input, config.rms_norm_eps
        self.self_attn = Gemma4TextAttention(config, layer_idx, **kw)
        self.mlp = Gemma3nTextMLP(config, layer_idx, **kw)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            setattr(self, name, RMSNorm(h, epsilon=eps, **kw))
        self.altup = Gemma3nTextAltUp(config, **kw)
        self.laurel = Gemma3nTextLaurelBlock(config, **kw)
        self.per_layer_input_gate = nnx.Linear(h, p, use_bias=False, **kw)
        self.per_layer_projection = nnx.Linear(p, h, use_bias=False, **kw)
        self.approximate = GELU_APPROXIMATE[config.hidden_activation]
        self.correct_scale = bool(config.altup_correct_scale)

    def __call__(self, streams, cos, sin, mask, per_layer_input, shared_kv=None, cache=None, cache_index=None,
                 causal_offset=None, dropout_rng=None):
        """``streams [n, b, s, h]`` -> ``(streams, new cache, (keys, values))``."""
        predictions = self.altup.predict(streams)
        active = predictions[self.altup.active]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        a, cache, kv = self.self_attn(normed, cos, sin, mask, shared_kv, cache, cache_index, causal_offset,
                                      dropout_rng)
        x = (active + self.post_attention_layernorm(a) + laurel) * jnp.asarray(2.0**-0.5, active.dtype)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        corrected = self.altup.correct(predictions, x)
        first = corrected[self.altup.active]
        if self.correct_scale:
            first = self.altup.scale_corrected_output(first)
        gated = _gelu(self.per_layer_input_gate(first), self.approximate) * per_layer_input
        added = self.post_per_layer_input_norm(self.per_layer_projection(gated))
        return corrected.at[1:].add(added[None]), cache, kv


class Gemma3nTextModel(nnx.Module):
    """The decoder stack: ``embed_tokens`` (scaled), the per-layer embeddings, the AltUp streams'
    projections in and out, ``layers``, ``norm``."""

    packs_sequences: ClassVar[bool] = True
    packed_inputs = LlamaModel.packed_inputs

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_gemma3n_config(config)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        linear = dict(use_bias=False, **kw)
        self.config = ConfigRef(config)
        self.remat = check_remat(getattr(config, "remat", "none"))
        h, n, p = config.hidden_size, config.num_hidden_layers, config.hidden_size_per_layer_input
        self.embed_tokens = ScaledEmbed(config.vocab_size, h, embed_scale=math.sqrt(h), **kw)
        self.per_layer_size, self.per_layer_vocab = int(p), int(config.vocab_size_per_layer_input)
        self.embed_tokens_per_layer = ScaledEmbed(self.per_layer_vocab, n * p, embed_scale=math.sqrt(p), **kw)
        self.per_layer_model_projection = nnx.Linear(h, n * p, **linear)
        self.per_layer_projection_norm = RMSNorm(p, epsilon=config.rms_norm_eps, **kw)
        streams = int(config.altup_num_inputs)
        self.altup_projections = nnx.List([nnx.Linear(h, h, **linear) for _ in range(1, streams)])
        self.altup_unembed_projections = nnx.List([nnx.Linear(h, h, **linear) for _ in range(1, streams)])
        self.layers = nnx.List([Gemma3nTextDecoderLayer(config, i, **kw) for i in range(n)])
        self.norm = RMSNorm(h, epsilon=config.rms_norm_eps, **kw)
        self.layer_types = tuple(config.layer_types)
        self.modes = tuple(kv_sharing_modes(config))
        rope = gemma3_rope_parameters(config)
        self.ropes = tuple((t, rotary_of(config, rope[t], config.head_dim)) for t in sorted(set(self.layer_types)))
        self.sliding_window = config.sliding_window

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """Runs the decoder; ``dropout_rng``: a key to apply ``attention_dropout`` (training);
        ``segment_ids``: packed rows, as :meth:`LlamaModel.__call__`'s."""
        segment_ids, attention_mask, position_ids = self.packed_inputs(segment_ids, attention_mask, position_ids,
                                                                       cache, None)
        x = embeddings_with_ids(self, input_ids, inputs_embeds)
        b, s, _ = x.shape
        per_layer = per_layer_inputs(self, jnp.asarray(input_ids), x, table_rows=self.per_layer_vocab)
        target = root_mean_square(x)
        streams = jnp.stack([x, *(rms_rescaled(proj(x), target) for proj in self.altup_projections)])
        pos = attn.decoder_positions(b, s, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                     cache_index=cache_index, prefix_kv=None, num_layers=len(self.layers),
                                     owner=type(self).__name__, prefix_layout=lambda: (0, 0))
        per_type = inputs_by_layer_type(self.ropes, self.sliding_window, pos, x.dtype, segment_ids)
        offset = attn.causal_offset(cache, None, pos.start)
        streams, new_cache, _ = run_sharing_layers(self, streams, per_type, per_layer, cache, pos.start, offset,
                                                   dropout_rng)
        target = root_mean_square(streams[0])
        out = [streams[0], *(rms_rescaled(proj(h), target) for proj, h in zip(self.altup_unembed_projections,
                                                                               streams[1:]))]
        return ModelOutput(last_hidden_state=self.norm(jnp.mean(jnp.stack(out), axis=0)), past_key_values=new_cache)


class Gemma3nForCausalLM(Gemma4ForCausalLM):
    """Gemma 3n text: the decoder above, the tied LM head, ``final_logit_softcapping``; reads the text
    model of a ``Gemma3nForConditionalGeneration`` checkpoint (the Hub's E2B and E4B) too."""

    model_class: ClassVar[type[nnx.Module]] = Gemma3nTextModel


register(Gemma3nForCausalLM, model_types=("gemma3n_text",), default=True)
