"""IBM Granite (3.x dense, ``model_type`` ``"granite"``) in Flax NNX: Llama with four multipliers.

- ``embedding_multiplier`` scales the input embeddings (also embeddings passed in place of ids,
  such as a prompt adapter's: transformers scales whatever enters the decoder);
- ``attention_multiplier`` is the attention's score scale, in place of ``head_dim ** -0.5``;
- ``residual_multiplier`` scales each branch before its residual add;
- ``logits_scaling`` divides the logits (here the hidden states the head reads, which is the same
  for a head without bias, and keeps the fused loss).

transformers has no Granite classifier; the causal LM is the one class.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from peftjax.models._outputs import ModelOutput


class GraniteAttention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale = float(config.attention_multiplier)


class GraniteDecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = GraniteAttention

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.residual_multiplier = float(config.residual_multiplier)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's key for ``attention_dropout`` (training); ``None``: none."""
        x, cache = attention_residual(self, x, cos, sin, masks, cache, cache_index, prefix, dropout_rng)
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_multiplier, cache


def attention_residual(layer, x, *attention_args):
    """``x`` plus ``layer``'s attention of its normed input, times Granite's ``residual_multiplier``,
    and the attention's cache (the dense and the MoE layers' first half)."""
    a, cache = layer.self_attn(layer.input_layernorm(x), *attention_args)
    return x + a * layer.residual_multiplier, cache


def scaled_embeddings(model, input_ids, inputs_embeds):
    """A Granite decoder's layers' input: the embeddings (of ``input_ids``, or ``inputs_embeds`` as
    given) times the config's ``embedding_multiplier``, as transformers scales whatever enters."""
    if inputs_embeds is None:
        inputs_embeds = model.embed_tokens(jnp.asarray(input_ids))
    return jnp.asarray(inputs_embeds) * float(model.config.embedding_multiplier)


class GraniteModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = GraniteDecoderLayer

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaModel` (packed rows too), the embeddings scaled by
        ``embedding_multiplier``."""
        return super().__call__(None, attention_mask, position_ids, scaled_embeddings(self, input_ids, inputs_embeds),
                                cache, cache_index, prefix_kv, dropout_rng, segment_ids=segment_ids)


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite: Llama with embedding, attention, residual and logit multipliers."""

    model_class: ClassVar[type[nnx.Module]] = GraniteModel

    def head_input(self, h):
        return h / jnp.asarray(self.config.logits_scaling, h.dtype)


register(GraniteForCausalLM, model_types=("granite",), default=True)
