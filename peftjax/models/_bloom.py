"""BigScience's BLOOM (``model_type`` ``"bloom"``: bloom-560m to bloom-176b and BLOOMZ, the model of
PEFT's prompt-tuning guide) in Flax NNX, with transformers' module names.

What differs from Llama:

- the decoder is ``transformer``: ``word_embeddings``, then ``word_embeddings_layernorm`` (a
  LayerNorm of the embeddings, virtual tokens' too), the blocks ``h``, ``ln_f``; the LM head tied;
- no RoPE: ALiBi, each head's scores of a key plus ``slope[head] * position`` of the key, its
  position counting the row's real keys (``(cumsum(mask) - 1) * mask``, a prefix's entries
  first), the slopes BLOOM's geometric series; translation-invariant, so packed rows need no
  restart;
- each block's ``self_attention`` is one ``query_key_value`` (each head's query, key and value in
  turn) and ``dense``, biased; the MLP ``dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))``, 4x wide;
  LayerNorms before attention and MLP (``input_layernorm``, ``post_attention_layernorm``), each
  branch added to its input, or to its normalised input with
  ``apply_residual_connection_post_layernorm``;
- ``hidden_dropout`` on each branch's output, ``attention_dropout`` on the probabilities.

``pretraining_tp`` with ``slow_but_exact`` (transformers sums the output projections in slices)
computes the same projections in one matmul here (float32 rounding apart).
"""

from __future__ import annotations

import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._llama import (
    DecoderUnderPrefix,
    DenseMLP,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    layer_norm,
)
from peftjax.models._gpt_neox import GPTNeoXAttention
from peftjax.nn._dropout import split_keys

ALIBI = "alibi"  # the key of the layers' ALiBi bias among the decoder's masks


def alibi_slopes(num_heads: int) -> np.ndarray:
    """BLOOM's ALiBi slopes (transformers' ``_get_alibi_slopes``): a geometric series over the
    largest power of two of heads, then every other term of the next one's."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2 ** (-(2 ** -(math.log2(closest) - 3))))
    slopes = base ** np.arange(1, 1 + closest, dtype=np.float32)
    if closest != num_heads:
        extra = np.float32(2 ** (-(2 ** -(math.log2(2 * closest) - 3))))
        more = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra ** np.arange(1, 1 + 2 * more, 2, dtype=np.float32)])
    return slopes.astype(np.float32)


class BloomAttention(GPTNeoXAttention):
    """GPT-NeoX's fused per-head ``query_key_value`` and ``dense`` (biased: BLOOM's config has no
    ``attention_bias``, which GPT-NeoX's defaults to true), with ALiBi for RoPE."""

    def score_options(self, masks) -> dict:
        return {"bias": masks[ALIBI]}


class BloomMLP(DenseMLP):
    """``dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))``, four times as wide as the hidden size."""

    names: ClassVar[tuple[str, str]] = ("dense_h_to_4h", "dense_4h_to_h")

    @staticmethod
    def width(config) -> int:
        return 4 * config.hidden_size

    @classmethod
    def activation_of(cls, config) -> str:
        return "gelu_pytorch_tanh"  # BloomGelu: the tanh approximation


class BloomBlock(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = layer_norm(config, **kw)
        self.self_attention = BloomAttention(config, layer_idx, **kw)
        self.post_attention_layernorm = layer_norm(config, **kw)
        self.mlp = BloomMLP(config, **kw)
        self.post_norm_residual = bool(getattr(config, "apply_residual_connection_post_layernorm", False))
        self.dropout_rate = float(getattr(config, "hidden_dropout", 0.0) or 0.0)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training); ``None``: no dropout."""
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        h = self.input_layernorm(x)
        a, cache = self.self_attention(h, cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = (h if self.post_norm_residual else x) + dropout(a, self.dropout_rate, attn_out_key)
        h = self.post_attention_layernorm(x)
        return (h if self.post_norm_residual else x) + dropout(self.mlp(h), self.dropout_rate, mlp_out_key), cache


class BloomModel(LlamaModel):
    """BLOOM's decoder: ``word_embeddings``, ``word_embeddings_layernorm``, ``h``, ``ln_f``."""

    layer_class: ClassVar[type[nnx.Module]] = BloomBlock
    embed_name: ClassVar[str] = "word_embeddings"
    layers_name: ClassVar[str] = "h"
    norm_name: ClassVar[str] = "ln_f"
    make_norm = staticmethod(layer_norm)

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.word_embeddings_layernorm = layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def make_rotary(config):
        return None

    def add_positions(self, x, position_ids):
        return self.word_embeddings_layernorm(x)  # the positions are ALiBi's, in the attention

    def attention_masks(self, pos: attn.DecoderPositions, segment_ids=None) -> dict:
        masks = super().attention_masks(pos, segment_ids)
        slopes = jnp.asarray(alibi_slopes(self.config.num_attention_heads))
        masks[ALIBI] = slopes[None, :, None] * attn.alibi_key_positions(pos.key_mask)[:, None]
        return masks


class _UnderTransformer(DecoderUnderPrefix):
    base_model_prefix: ClassVar[str] = "transformer"
    model_class: ClassVar[type[nnx.Module]] = BloomModel


class BloomForCausalLM(_UnderTransformer, LlamaForCausalLM):
    """BLOOM: ``transformer`` and the LM head (tied to ``word_embeddings`` by default)."""


class BloomForSequenceClassification(_UnderTransformer, LlamaForSequenceClassification):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class BloomForTokenClassification(_UnderTransformer, LlamaForTokenClassification):
    """Token classification: the decoder, dropout (``classifier_dropout``, else ``hidden_dropout``)
    and a biased ``classifier`` on every token."""

    head_name: ClassVar[str] = "classifier"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class BloomForQuestionAnswering(_UnderTransformer, LlamaForQuestionAnswering):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


register(BloomForCausalLM, model_types=("bloom",), default=True)
register(BloomForSequenceClassification)
register(BloomForTokenClassification)
register(BloomForQuestionAnswering)
