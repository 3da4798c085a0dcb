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

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    DenseMLP,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    ParallelDecoderLayer,
)


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


class PhiMLP(DenseMLP):
    """``fc2(act(fc1(x)))``."""

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
    embedding_dropout: ClassVar[str] = "embd_pdrop"
    make_norm = staticmethod(_norm)


class PhiForCausalLM(LlamaForCausalLM):
    """Phi-1/1.5/2: parallel blocks, partial RoPE, a biased LM head."""

    model_class: ClassVar[type[nnx.Module]] = PhiModel
    lm_head_bias: ClassVar[bool] = True


class PhiForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = PhiModel


class PhiForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = PhiModel


register(PhiForCausalLM, model_types=("phi",), default=True)
register(PhiForSequenceClassification)
register(PhiForTokenClassification)
