"""Phi-3.5-MoE (``model_type`` ``"phimoe"``) in Flax NNX, under transformers' names.

Mixtral's decoder (``_mixtral``: 16 experts fused into ``mlp.experts.gate_up_proj`` /
``down_proj``, top 2, the load-balancing loss) with what Phi-3.5-MoE changes:

* LayerNorms with biases (``input_layernorm``, ``post_attention_layernorm``, the final ``norm``;
  epsilon ``rms_norm_eps``), biases on q/k/v/o by ``attention_bias`` and on ``lm_head`` by
  ``lm_head_bias``.
* The router ``mlp.router`` (the Hub's ``block_sparse_moe.gate``) picks experts with SparseMixer
  (:func:`sparsemixer`): an expert whose logit is far below the best (relative gap over
  ``2 * router_jitter_noise``) is masked; the first expert is the best logit, weighted by its
  softmax over the unmasked; the second the best of the rest, weighted by the softmax over the
  rest. The weights are not renormalised.
* RoPE: with a ``longrope`` ``rope_parameters`` cos and sin are multiplied by ``short_mscale``, or by
  ``long_mscale`` for a call whose largest position reaches past
  ``original_max_position_embeddings``; the frequencies are the short factors' at every length, as
  transformers 5.24's ``PhimoeRotaryEmbedding`` computes them (it calls the longrope formula
  without the sequence length). ``generate`` reruns its sequence where it first crosses that
  length, as transformers' does (Phi-3's rule).

Training: while a dropout key is active (the train step's), SparseMixer samples each token's two
experts as transformers does in ``train()`` mode: Gumbel noise on the masked logits, and the
weights' gradient is that of the sampled experts' softmax probabilities while the forward
multiplies each weight by 1/3 at random where the sample was not the best (Heun's third-order
rule, PhimoeMultiplier); ``input_jitter_noise`` multiplies the MLP's input by
``uniform(1 - j, 1 + j)``, twice as transformers does (the block and the router each). The noise
is JAX's, drawn from the dropout key; the computation given the same noise is transformers'
(``tests/test_phimoe.py`` feeds torch the same draws).

Checkpoints: the Hub's per-expert layout (``block_sparse_moe.gate``, ``experts.{e}.w1/w2/w3``) and
transformers 5's fused one both load; ``save_pretrained`` writes the Hub's. PEFT 0.22.0 converts no
PhiMoE target (transformers maps no conversion pattern to it): LoRA on the experts and the router
goes through ``target_parameters`` (``gate_up_proj``, ``down_proj``, ``router.weight``).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._mixtral import (
    ExpertLayout,
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralForSequenceClassification,
    MixtralModel,
    MixtralSparseMoeBlock,
)
from peftjax.models._llama import head_dim_of
from peftjax.models._phi3 import Phi3ForCausalLM
from peftjax.models._rope import RotaryEmbedding, rope_parameters, rotary_embedding
from peftjax.nn._dropout import active_dropout_key, fold_key

PHIMOE_EXPERTS = ExpertLayout("PhiMoE", "block_sparse_moe", gate="w1", up="w3", down="w2", router="router")


def _gap_mask(scores: jax.Array, best: jax.Array, jitter_eps: float) -> jax.Array:
    """Where a logit is masked: its gap below ``best``, relative to ``max(|logit|, best)``, exceeds
    ``2 * jitter_eps`` (no gradient flows through the mask)."""
    scores, best = jax.lax.stop_gradient(scores), jax.lax.stop_gradient(best)
    return (best - scores) / jnp.maximum(jnp.abs(scores), best) > 2 * jitter_eps


def _pick(logits: jax.Array, scores: jax.Array, jitter_eps: float, noise) -> tuple[jax.Array, jax.Array]:
    """One of SparseMixer's two picks over ``logits`` (``scores`` with the first pick at ``-inf`` for
    the second): ``(weight [tokens, 1], expert [tokens, 1])``."""
    best = jnp.max(logits, axis=-1, keepdims=True)
    masked = jnp.where(_gap_mask(scores, best, jitter_eps), -jnp.inf, logits)
    if noise is None:
        expert = jnp.argmax(logits, axis=-1)[:, None]
    else:  # Gumbel sampling: the largest masked logit minus the log of an exponential draw
        exponential, uniform = noise
        expert = jnp.argmax(masked - jnp.log(exponential), axis=-1)[:, None]
    probs = jax.nn.softmax(masked, axis=-1)
    weight = jnp.take_along_axis(probs, expert, axis=-1)
    if noise is not None:  # Heun's third-order rule: the forward scaled by 1/3 at random, the gradient not
        kept = (expert == jnp.argmax(probs, axis=-1)[:, None]) | (uniform > 0.75)
        scale = jnp.float32(0.3333) + jnp.float32(0.6667) * kept.astype(jnp.float32)
        weight = weight + jax.lax.stop_gradient(weight * scale - weight)
    return weight, expert


def sparsemixer(scores: jax.Array, jitter_eps: float, noise=None) -> tuple[jax.Array, jax.Array]:
    """PhiMoE's top-2 routing (transformers' ``sparsemixer``): ``(weights, experts)``, ``[tokens, 2]`` each.

    Args:
      scores: The router logits ``[tokens, experts]`` (computed in float32).
      jitter_eps: ``router_jitter_noise``, the relative gap below the best logit past which an expert
        is masked.
      noise: ``None`` (evaluation: the best unmasked experts) or the training draws
        ``(exponential_1, uniform_1, exponential_2, uniform_2)``: exponential variates
        ``[tokens, experts]`` for the Gumbel sampling of each pick and uniform ones ``[tokens, 1]``
        for its Heun's rule.
    """
    scores = scores.astype(jnp.float32)
    first_noise = second_noise = None
    if noise is not None:
        first_noise, second_noise = noise[:2], noise[2:]
    w1, e1 = _pick(scores, scores, jitter_eps, first_noise)
    rest = jnp.where(jax.nn.one_hot(e1[:, 0], scores.shape[-1], dtype=bool), -jnp.inf, scores)
    w2, e2 = _pick(rest, scores, jitter_eps, second_noise)
    return jnp.concatenate([w1, w2], axis=-1), jnp.concatenate([e1, e2], axis=-1)


def sparsemixer_noise(key: jax.Array, tokens: int, experts: int) -> tuple[jax.Array, ...]:
    """The draws :func:`sparsemixer` takes while training, from ``key``."""
    k = jax.random.split(key, 4)
    return (jax.random.exponential(k[0], (tokens, experts), jnp.float32),
            jax.random.uniform(k[1], (tokens, 1), jnp.float32),
            jax.random.exponential(k[2], (tokens, experts), jnp.float32),
            jax.random.uniform(k[3], (tokens, 1), jnp.float32))


def check_phimoe_config(config) -> None:
    """Refuses by name what transformers' PhiMoE would not run or this one does not do."""
    if config.num_experts_per_tok != 2:
        raise ValueError(f"num_experts_per_tok={config.num_experts_per_tok}: PhiMoE's SparseMixer routes each "
                         f"token to exactly 2 experts (transformers' sparsemixer ignores other values)")


class PhimoeSparseMoeBlock(MixtralSparseMoeBlock):
    """The router (``router``) and the experts, routed by :func:`sparsemixer`."""

    router_name: ClassVar[str] = "router"

    def __init__(self, config, layer_idx: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_phimoe_config(config)
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_jitter = float(getattr(config, "input_jitter_noise", 0.0) or 0.0)

    def __call__(self, x):
        """``(output [b, s, hidden], router logits [b * s, experts])``."""
        b, s, h = x.shape
        key = active_dropout_key()
        noise = None
        if key is not None:  # training: transformers' input jitter (block, then router) and sampled experts
            key = fold_key(key, zlib.crc32(f"mlp.sparsemixer.{self.layer_idx}".encode()))
            k_block, k_router, k_route = jax.random.split(key, 3)
            if self.input_jitter > 0:
                low, high = 1.0 - self.input_jitter, 1.0 + self.input_jitter
                x = x * jax.random.uniform(k_block, x.shape, x.dtype, low, high)
                x = x * jax.random.uniform(k_router, x.shape, x.dtype, low, high)
            noise = sparsemixer_noise(k_route, b * s, self.router.weight.get_value().shape[0])
        flat = x.reshape(b * s, h)
        logits = self.router(flat)
        top, index = sparsemixer(logits, self.jitter_noise, noise)
        return self.experts.routed(flat, top, index, self.dispatch).reshape(b, s, h), logits


class PhimoeDecoderLayer(MixtralDecoderLayer):
    """Mixtral's layer with LayerNorms (biases) and SparseMixer's routing."""

    moe_class: ClassVar[type[nnx.Module]] = PhimoeSparseMoeBlock

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = nnx.LayerNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.post_attention_layernorm = nnx.LayerNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)


def phimoe_rotary(config, head_dim: int) -> RotaryEmbedding:
    """PhiMoE's RoPE as transformers 5.24 computes it (see the module docstring).

    Raises:
      ValueError: a ``rope_type`` other than ``"default"`` and ``"longrope"``, or a longrope without
        numeric ``short_mscale`` and ``long_mscale`` (transformers' config refuses those too).
    """
    p = rope_parameters(config)
    if p["rope_type"] == "default":
        return rotary_embedding(config, head_dim)
    if p["rope_type"] != "longrope":
        raise ValueError(f"phimoe: rope_type {p['rope_type']!r} is not supported; supported: ['default', 'longrope']")
    short, long = p.get("short_mscale"), p.get("long_mscale")
    if not all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in (short, long)):
        raise ValueError(f"phimoe: rope_parameters with rope_type 'longrope' need numbers short_mscale and "
                         f"long_mscale; got {short!r} and {long!r}")
    rope = rotary_embedding(config, head_dim)
    return dataclasses.replace(rope, long_inv_freq=rope.inv_freq, scaling=float(short), long_scaling=float(long))


class PhimoeModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = PhimoeDecoderLayer

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        return nnx.LayerNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    @staticmethod
    def make_rotary(config):
        return phimoe_rotary(config, head_dim_of(config))


class PhimoeForCausalLM(MixtralForCausalLM):
    """Phi-3.5-MoE: Mixtral's experts routed by SparseMixer, LayerNorms, biases by the config."""

    model_class: ClassVar[type[nnx.Module]] = PhimoeModel
    expert_layout: ClassVar[ExpertLayout] = PHIMOE_EXPERTS
    _generation_rerun_step = Phi3ForCausalLM._generation_rerun_step
    embed_input_ids = Phi3ForCausalLM.embed_input_ids

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.lm_head_bias = bool(getattr(config, "lm_head_bias", False))
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class PhimoeForSequenceClassification(MixtralForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = PhimoeModel
    expert_layout: ClassVar[ExpertLayout] = PHIMOE_EXPERTS


register(PhimoeForCausalLM, model_types=("phimoe",), default=True)
register(PhimoeForSequenceClassification)
