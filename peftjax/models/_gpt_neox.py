"""EleutherAI's GPT-NeoX (``model_type`` ``"gpt_neox"``: Pythia, GPT-NeoX-20B, and the models built
on them) in Flax NNX, with transformers' module names.

What differs from Llama:

- the decoder is ``gpt_neox`` (``embed_in``, ``layers``, ``final_layer_norm``); transformers 5's
  LM head ``lm_head`` is ``embed_out`` in the files (read under either name, written as
  ``embed_out``, as transformers writes it);
- each layer's attention is ``attention``: one ``query_key_value`` projection whose output holds,
  for each head in turn, its query, key and value (``[heads, 3 * head_dim]``), and ``dense``;
  biases on both (``attention_bias``); RoPE on the first ``partial_rotary_factor`` (``rotary_pct``,
  0.25 by default) of each head;
- LayerNorms with biases (``input_layernorm``, ``post_attention_layernorm``); with
  ``use_parallel_residual`` (the default) attention and MLP read the same input, each through its
  own norm, and both are added to it, else one after the other;
- the MLP is ``dense_4h_to_h(act(dense_h_to_4h(x)))`` (exact GELU by default), with biases;
- ``hidden_dropout`` drops from the embeddings and from each branch's output, ``attention_dropout``
  from the attention probabilities, ``classifier_dropout`` before the token classifier's
  ``classifier``.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._llama import (
    DecoderUnderPrefix,
    DenseMLP,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from peftjax.nn._dropout import split_keys

# the old checkpoints' buffers (the causal mask, its fill value, RoPE's frequencies)
_BUFFERS = (r".*attention\.(bias|masked_bias)", r".*rotary_emb\.inv_freq")


def _hidden_dropout(config) -> float:
    return float(getattr(config, "hidden_dropout", 0.0) or 0.0)


class GPTNeoXAttention(LlamaAttention):
    out_name: ClassVar[str] = "dense"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, layer_idx)
        if self.num_kv_heads != self.num_heads:
            raise ValueError("gpt_neox: every head has its own keys and values; num_key_value_heads must be "
                             f"num_attention_heads ({self.num_heads}), got {self.num_kv_heads}")
        bias = bool(getattr(config, "attention_bias", True))
        h = config.hidden_size
        kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_key_value = nnx.Linear(h, 3 * h, **kw)
        self.dense = nnx.Linear(h, h, **kw)

    def project(self, x):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).reshape(b, s, self.num_heads, 3 * self.head_dim)
        return tuple(jnp.split(qkv, 3, axis=-1))


class GPTNeoXMLP(DenseMLP):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))``."""

    names: ClassVar[tuple[str, str]] = ("dense_h_to_4h", "dense_4h_to_h")


def _norm(config, **kw) -> nnx.Module:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, **kw)


class GPTNeoXLayer(nnx.Module):
    """Attention and MLP, each after its own LayerNorm: side by side on the layer's input
    (``use_parallel_residual``) or one after the other."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = _norm(config, **kw)
        self.post_attention_layernorm = _norm(config, **kw)
        self.attention = GPTNeoXAttention(config, layer_idx, **kw)
        self.mlp = GPTNeoXMLP(config, **kw)
        self.parallel = bool(getattr(config, "use_parallel_residual", True))
        self.dropout_rate = _hidden_dropout(config)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training): ``attention_dropout`` on the
        attention probabilities, ``hidden_dropout`` on each branch's output; ``None``: none."""
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        a, cache = self.attention(self.input_layernorm(x), cos, sin, masks, cache, cache_index, prefix, attn_key)
        a = dropout(a, self.dropout_rate, attn_out_key)
        if self.parallel:
            return x + a + dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout_rate, mlp_out_key), cache
        x = x + a
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout_rate, mlp_out_key), cache


class GPTNeoXModel(LlamaModel):
    """GPT-NeoX's decoder: ``embed_in`` (then ``hidden_dropout``), ``layers``, ``final_layer_norm``."""

    layer_class: ClassVar[type[nnx.Module]] = GPTNeoXLayer
    embed_name: ClassVar[str] = "embed_in"
    norm_name: ClassVar[str] = "final_layer_norm"
    embedding_dropout: ClassVar[str] = "hidden_dropout"
    make_norm = staticmethod(_norm)


class _UnderGPTNeoX(DecoderUnderPrefix):
    base_model_prefix: ClassVar[str] = "gpt_neox"
    model_class: ClassVar[type[nnx.Module]] = GPTNeoXModel


class GPTNeoXForCausalLM(_UnderGPTNeoX, LlamaForCausalLM):
    """GPT-NeoX and Pythia: ``gpt_neox`` and the LM head (``embed_out`` in the files)."""

    ignored_keys: ClassVar[tuple[str, ...]] = _BUFFERS

    def _align_prefix(self, keys: set[str], expected: set[str]) -> dict[str, str]:
        mapped = super()._align_prefix(keys, expected)
        return {k: "lm_head." + v[len("embed_out."):] if v.startswith("embed_out.") else v for k, v in mapped.items()}

    def checkpoint_layout(self, state):
        return {"embed_out." + k[len("lm_head."):] if k.startswith("lm_head.") else k: v for k, v in state.items()}


class GPTNeoXForSequenceClassification(_UnderGPTNeoX, LlamaForSequenceClassification):
    ignored_keys: ClassVar[tuple[str, ...]] = (*_BUFFERS, r"(embed_out|lm_head)\.weight")


class GPTNeoXForTokenClassification(_UnderGPTNeoX, LlamaForTokenClassification):
    """Token classification: the decoder, ``classifier_dropout`` and a biased ``classifier`` on every token."""

    head_name: ClassVar[str] = "classifier"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (*_BUFFERS, r"(embed_out|lm_head)\.weight")


class GPTNeoXForQuestionAnswering(_UnderGPTNeoX, LlamaForQuestionAnswering):
    ignored_keys: ClassVar[tuple[str, ...]] = (*_BUFFERS, r"(embed_out|lm_head)\.weight")


register(GPTNeoXForCausalLM, model_types=("gpt_neox",), default=True)
register(GPTNeoXForSequenceClassification)
register(GPTNeoXForTokenClassification)
register(GPTNeoXForQuestionAnswering)
