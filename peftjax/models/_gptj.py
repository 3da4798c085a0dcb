"""EleutherAI's GPT-J (``model_type`` ``"gptj"``: GPT-J-6B and the models built on it) in Flax NNX,
with transformers' module names.

What differs from Llama:

- the decoder is ``transformer``: ``wte`` (then ``embd_pdrop``), blocks ``h``, ``ln_f``; the LM
  head has a bias;
- each block normalises its input once (``ln_1``, a LayerNorm) and adds attention and MLP, both
  of that input, to the residual, each after ``resid_pdrop``'s dropout;
- the attention's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` have no biases; RoPE on the
  first ``rotary_dim`` dims of each head, turning adjacent pairs (``rotate_every_two``, GLM's);
- the MLP is ``fc_out(gelu_new(fc_in(x)))``, ``n_inner`` wide (4x the hidden size by default).
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._dropout import dropout
from peftjax.models._glm4 import rotate_pairs
from peftjax.models._llama import (
    DecoderUnderPrefix,
    DenseMLP,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaModel,
    layer_norm,
)
from peftjax.nn._dropout import split_keys


class GPTJAttention(LlamaAttention):
    out_name: ClassVar[str] = "out_proj"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # no biases: no flag
        self.dropout_rate = float(getattr(config, "attn_pdrop", 0.0) or 0.0)

    def rotate(self, x, cos, sin):
        return rotate_pairs(x, cos, sin)


class GPTJMLP(DenseMLP):
    """``fc_out(act(fc_in(x)))``, ``n_inner`` wide (four times the hidden size by default)."""

    names: ClassVar[tuple[str, str]] = ("fc_in", "fc_out")
    activation_field: ClassVar[str] = "activation_function"

    @staticmethod
    def width(config) -> int:
        return getattr(config, "n_inner", None) or 4 * config.hidden_size


class GPTJBlock(nnx.Module):
    """``ln_1``, then ``attn`` and ``mlp`` side by side on its output, both added to the residual."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = layer_norm(config, **kw)
        self.attn = GPTJAttention(config, layer_idx, **kw)
        self.mlp = GPTJMLP(config, **kw)
        self.dropout_rate = float(getattr(config, "resid_pdrop", 0.0) or 0.0)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training): ``attn_pdrop`` on the probabilities,
        ``resid_pdrop`` on each branch's output; ``None``: none."""
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        h = self.ln_1(x)
        a, cache = self.attn(h, cos, sin, masks, cache, cache_index, prefix, attn_key)
        a = dropout(a, self.dropout_rate, attn_out_key)
        return x + a + dropout(self.mlp(h), self.dropout_rate, mlp_out_key), cache


class GPTJModel(LlamaModel):
    """GPT-J's decoder: ``wte`` (then ``embd_pdrop``), ``h``, ``ln_f``."""

    layer_class: ClassVar[type[nnx.Module]] = GPTJBlock
    embed_name: ClassVar[str] = "wte"
    layers_name: ClassVar[str] = "h"
    norm_name: ClassVar[str] = "ln_f"
    embedding_dropout: ClassVar[str] = "embd_pdrop"
    make_norm = staticmethod(layer_norm)

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        if not getattr(config, "rotary_dim", None):
            raise ValueError("gptj: rotary_dim must be set (transformers' GPT-J rotates the first rotary_dim dims of "
                             "each head; without it, it fails too)")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

class _UnderTransformer(DecoderUnderPrefix):
    base_model_prefix: ClassVar[str] = "transformer"
    model_class: ClassVar[type[nnx.Module]] = GPTJModel


class GPTJForCausalLM(_UnderTransformer, LlamaForCausalLM):
    """GPT-J: ``transformer`` and a biased LM head."""

    lm_head_bias: ClassVar[bool] = True


class GPTJForSequenceClassification(_UnderTransformer, LlamaForSequenceClassification):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.(weight|bias)",)


class GPTJForQuestionAnswering(_UnderTransformer, LlamaForQuestionAnswering):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.(weight|bias)",)


register(GPTJForCausalLM, model_types=("gptj",), default=True)
register(GPTJForSequenceClassification)
register(GPTJForQuestionAnswering)
