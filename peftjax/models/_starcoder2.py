"""BigCode's StarCoder2 (``model_type`` ``"starcoder2"``: starcoder2-3b, -7b, -15b) in Flax NNX, with
transformers' module names.

What differs from Llama:

- LayerNorms with biases (``input_layernorm``, ``post_attention_layernorm``, ``norm``;
  ``norm_epsilon``); biases on every projection (``use_bias``);
- the MLP is ``c_proj(act(c_fc(x)))`` (``gelu_pytorch_tanh`` by default), no gate;
- a sliding window on every layer (``sliding_window``), grouped-query attention;
- ``embedding_dropout`` on the embeddings, ``residual_dropout`` on each branch's output (the
  attention's and the MLP's), ``attention_dropout`` on the probabilities; a tied head by default.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    _biases,
)
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import split_keys


def _norm(config, **kw) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.norm_epsilon, **kw)


class Starcoder2MLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=_biases(config)[2], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.c_proj = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)
        self.activation = config.hidden_act
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"starcoder2: hidden_act {self.activation!r} is not supported; supported: "
                             f"{sorted(ACTIVATIONS)}")

    def __call__(self, x):
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with LayerNorms and StarCoder2's MLP; ``residual_dropout`` on each branch."""

    mlp_class: ClassVar[type[nnx.Module]] = Starcoder2MLP
    make_norm = staticmethod(_norm)


class Starcoder2Model(LlamaModel):
    """StarCoder2's decoder: ``embed_tokens`` (then ``embedding_dropout``), ``layers``, ``norm``."""

    layer_class: ClassVar[type[nnx.Module]] = Starcoder2DecoderLayer
    make_norm = staticmethod(_norm)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaModel` (packed rows too), the embeddings (also those
        passed in place of ids) dropped at ``embedding_dropout`` under a dropout key."""
        embed_key, layers_key = split_keys(dropout_rng, 2)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(jnp.asarray(input_ids))
        x = dropout(jnp.asarray(inputs_embeds), float(getattr(self.config, "embedding_dropout", 0.0) or 0.0),
                    embed_key)
        return super().__call__(None, attention_mask, position_ids, x, cache, cache_index, prefix_kv,
                                layers_key, segment_ids=segment_ids)


class Starcoder2ForCausalLM(LlamaForCausalLM):
    """StarCoder2: Llama's causal LM over :class:`Starcoder2Model` (a tied head by default)."""

    model_class: ClassVar[type[nnx.Module]] = Starcoder2Model


class Starcoder2ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Starcoder2Model


class Starcoder2ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Starcoder2Model


register(Starcoder2ForCausalLM, model_types=("starcoder2",), default=True)
register(Starcoder2ForSequenceClassification)
register(Starcoder2ForTokenClassification)
