"""Microsoft Phi-1, Phi-1.5 and Phi-2 (``model_type`` ``"phi"``) in Flax NNX, with transformers'
module names.

What differs from Llama:

- each layer normalises its input once (``input_layernorm``, a LayerNorm with bias) and adds
  attention and MLP, both of that input, to the residual, each after ``resid_pdrop``'s dropout;
- biases on every projection; the attention's output projection is ``dense``; the MLP is
  ``fc2(act(fc1(x)))`` (``gelu_new`` by default); with ``qk_layernorm``, a LayerNorm over each
  head's queries and keys (one weight for all heads);
- RoPE on the first ``partial_rotary_factor`` of each head (0.5 by default, Phi-2's files 0.4);
- ``embd_pdrop`` drops from the embeddings; the final norm is ``final_layernorm`` (with bias);
- the LM head has a bias (the loss takes the logits, not the fused projection).
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    ParallelDecoderLayer,
)
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import split_keys


class PhiAttention(LlamaAttention):
    out_name: ClassVar[str] = "dense"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_layernorm = self.k_layernorm = nnx.data(None)
        if getattr(config, "qk_layernorm", False):
            norm = dict(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.q_layernorm = nnx.LayerNorm(config.hidden_size // config.num_attention_heads, **norm)
            self.k_layernorm = nnx.LayerNorm(config.hidden_size // config.num_attention_heads, **norm)

    def project(self, x):
        q, k, v = super().project(x)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v


class PhiMLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)
        self.activation = config.hidden_act
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"phi: hidden_act {self.activation!r} is not supported; supported: {sorted(ACTIVATIONS)}")

    def __call__(self, x):
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


def _norm(config, **kw) -> nnx.Module:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)


class PhiDecoderLayer(ParallelDecoderLayer):
    """One LayerNorm, then attention and MLP side by side, both added to the residual, each after
    ``resid_pdrop``'s dropout."""

    attention_class: ClassVar[type[nnx.Module]] = PhiAttention
    mlp_class: ClassVar[type[nnx.Module]] = PhiMLP
    make_norm = staticmethod(_norm)


class PhiModel(LlamaModel):
    """Phi's decoder: ``embed_tokens`` (then ``embd_pdrop``), ``layers``, ``final_layernorm``."""

    layer_class: ClassVar[type[nnx.Module]] = PhiDecoderLayer
    norm_name: ClassVar[str] = "final_layernorm"
    make_norm = staticmethod(_norm)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaModel` (packed rows too), the embeddings (also those
        passed in place of ids) dropped at ``embd_pdrop`` under a dropout key."""
        embed_key, layers_key = split_keys(dropout_rng, 2)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(jnp.asarray(input_ids))
        x = dropout(jnp.asarray(inputs_embeds), float(getattr(self.config, "embd_pdrop", 0.0) or 0.0), embed_key)
        return super().__call__(None, attention_mask, position_ids, x, cache, cache_index, prefix_kv,
                                layers_key, segment_ids=segment_ids)


class PhiForCausalLM(LlamaForCausalLM):
    """Phi-1/1.5/2: parallel blocks, partial RoPE, a biased LM head."""

    model_class: ClassVar[type[nnx.Module]] = PhiModel
    lm_head_bias: ClassVar[bool] = True

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if getattr(config, "tie_word_embeddings", False):  # the bias would be dropped with a tied head
            raise ValueError("phi: tie_word_embeddings=True is not supported (Phi's LM head has a bias of its own)")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class PhiForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = PhiModel


class PhiForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = PhiModel


register(PhiForCausalLM, model_types=("phi",), default=True)
register(PhiForSequenceClassification)
register(PhiForTokenClassification)
