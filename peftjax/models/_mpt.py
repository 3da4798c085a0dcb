"""MosaicML's MPT (``model_type`` ``"mpt"``: MPT-7B and its instruct, chat and StoryWriter
variants, MPT-30B) in Flax NNX, with transformers' module names.

What differs from Llama, as transformers' ``MptModel`` computes it:

- the decoder is ``transformer``: ``wte``, the blocks ``blocks``, ``norm_f``; the LM head tied to
  ``wte`` by default; no position embeddings;
- ALiBi in the scores, each head's slope ``1 / 2^(8 i / n')`` over the next power of two ``n'`` of
  heads (every other one of those, then the rest, when the heads are not a power of two), times the
  key's position (softmax's translation invariance makes the key's position within the row's real
  tokens equivalent to transformers' slot index, so left padding and packed rows need nothing more);
- each block: ``norm_1`` (a LayerNorm without bias, as every norm here), ``attn.Wqkv`` (queries,
  keys and values one after the other, clamped to ``attn_config.clip_qkv``), scaled by
  ``attn_config.softmax_scale`` (default ``head_dim ** -0.5``), ``attn.out_proj``; ``norm_2``,
  ``ffn.down_proj(gelu(ffn.up_proj(x)))`` four times as wide; no biases;
- ``attn_config.attn_pdrop`` drops the probabilities, the attention's output and the MLP's output.

transformers' MPT computes neither the ``attn_config`` options ``qk_ln``, ``prefix_lm``,
``attn_uses_sequence_id`` and ``alibi=False`` nor an ``alibi_bias_max`` other than 8 nor
multi-query attention: a config asking for them is refused by name here rather than run as
something its authors did not train.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._bloom import ALIBI
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


# attn_config: what transformers' MPT computes (the defaults) and what it would silently ignore
_ATTN_DEFAULTS = {"attn_type": "multihead_attention", "attn_pdrop": 0, "clip_qkv": None, "softmax_scale": None,
                  "prefix_lm": False, "qk_ln": False, "attn_uses_sequence_id": False, "alibi": True,
                  "alibi_bias_max": 8}
_IGNORED_BY_TRANSFORMERS = ("attn_type", "prefix_lm", "qk_ln", "attn_uses_sequence_id", "alibi", "alibi_bias_max")


def attn_config(config) -> dict:
    """``config.attn_config`` with transformers' defaults filled in (a dict, or a config object).

    Raises:
      ValueError: an option transformers' MPT does not compute (named, with its value).
    """
    raw = getattr(config, "attn_config", None) or {}
    if not isinstance(raw, dict):
        raw = raw.to_dict()
    out = {**_ATTN_DEFAULTS, **{k: v for k, v in raw.items() if k in _ATTN_DEFAULTS}}
    unsupported = {k: out[k] for k in _IGNORED_BY_TRANSFORMERS if out[k] != _ATTN_DEFAULTS[k]}
    if unsupported:
        raise ValueError(f"mpt: attn_config {unsupported} is not supported (transformers' MPT computes "
                         f"{ {k: _ATTN_DEFAULTS[k] for k in unsupported} } whatever the config says)")
    return out


def alibi_slopes(num_heads: int) -> np.ndarray:
    """MPT's ALiBi slopes (transformers' ``build_mpt_alibi_tensor``, ``alibi_bias_max=8``)."""
    padded = 2 ** int(np.ceil(np.log2(num_heads)))
    base = np.arange(1, padded + 1, dtype=np.float32) * np.float32(8 / padded)
    slopes = (1.0 / np.power(np.float32(2), base)).astype(np.float32)
    if padded != num_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def _norm(config, **kw) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, use_bias=False, **kw)


class MptAttention(LlamaAttention):
    """``Wqkv`` (``[q | k | v]``, clamped to ``clip_qkv``) and ``out_proj``, no biases, ALiBi."""

    out_name: ClassVar[str] = "out_proj"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, layer_idx)
        options = attn_config(config)
        self.clip = options["clip_qkv"]
        if options["softmax_scale"] is not None:
            self.scale = float(options["softmax_scale"])
        self.dropout_rate = float(options["attn_pdrop"] or 0.0)
        h = config.hidden_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.Wqkv = nnx.Linear(h, 3 * h, **kw)
        self.out_proj = nnx.Linear(h, h, **kw)

    def project(self, x):
        b, s, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip:
            qkv = jnp.clip(qkv, -self.clip, self.clip)
        return tuple(t.reshape(b, s, self.num_heads, self.head_dim) for t in jnp.split(qkv, 3, axis=-1))

    def score_options(self, masks) -> dict:
        return {"bias": masks[ALIBI]}


class MptMLP(DenseMLP):
    """``down_proj(gelu(up_proj(x)))``, four times as wide as the hidden size, no biases."""

    names: ClassVar[tuple[str, str]] = ("up_proj", "down_proj")

    @staticmethod
    def width(config) -> int:
        return 4 * config.hidden_size

    @classmethod
    def activation_of(cls, config) -> str:
        return "gelu"  # exact (erf), as transformers' nn.GELU()

    @staticmethod
    def bias(config) -> bool:
        return False


class MptBlock(nnx.Module):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_1 = _norm(config, **kw)
        self.attn = MptAttention(config, layer_idx, **kw)
        self.norm_2 = _norm(config, **kw)
        self.ffn = MptMLP(config, **kw)
        self.dropout_rate = float(attn_config(config)["attn_pdrop"] or 0.0)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training); ``None``: no dropout."""
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        a, cache = self.attn(self.norm_1(x), cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = x + dropout(a, self.dropout_rate, attn_out_key)
        return x + dropout(self.ffn(self.norm_2(x)), self.dropout_rate, mlp_out_key), cache


class MptModel(LlamaModel):
    """MPT's decoder: ``wte``, ``blocks``, ``norm_f``, ALiBi for positions."""

    layer_class: ClassVar[type[nnx.Module]] = MptBlock
    embed_name: ClassVar[str] = "wte"
    layers_name: ClassVar[str] = "blocks"
    norm_name: ClassVar[str] = "norm_f"
    make_norm = staticmethod(_norm)

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        attn_config(config)  # refuses what transformers would ignore before any weight is built
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def make_rotary(config):
        return None

    def add_positions(self, x, position_ids):
        return x  # the positions are ALiBi's, in the attention

    def attention_masks(self, pos: attn.DecoderPositions, segment_ids=None) -> dict:
        masks = super().attention_masks(pos, segment_ids)
        slopes = jnp.asarray(alibi_slopes(self.config.num_attention_heads))
        masks[ALIBI] = slopes[None, :, None] * attn.alibi_key_positions(pos.key_mask)[:, None]
        return masks


class _UnderTransformer(DecoderUnderPrefix):
    base_model_prefix: ClassVar[str] = "transformer"
    model_class: ClassVar[type[nnx.Module]] = MptModel


class MptForCausalLM(_UnderTransformer, LlamaForCausalLM):
    """MPT: ``transformer`` and the LM head (tied to ``wte`` by default)."""


class MptForSequenceClassification(_UnderTransformer, LlamaForSequenceClassification):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class MptForTokenClassification(_UnderTransformer, LlamaForTokenClassification):
    """Token classification: the decoder, dropout (``classifier_dropout``, else ``hidden_dropout``)
    and a biased ``classifier`` on every token."""

    head_name: ClassVar[str] = "classifier"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class MptForQuestionAnswering(_UnderTransformer, LlamaForQuestionAnswering):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


register(MptForCausalLM, model_types=("mpt",), default=True)
register(MptForSequenceClassification)
register(MptForTokenClassification)
register(MptForQuestionAnswering)
