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

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    DenseMLP,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    _biases,
)


def _norm(config, **kw) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.norm_epsilon, **kw)


class Starcoder2MLP(DenseMLP):
    """``c_proj(act(c_fc(x)))``, biased by ``use_bias``."""

    names: ClassVar[tuple[str, str]] = ("c_fc", "c_proj")

    @staticmethod
    def bias(config) -> bool:
        return _biases(config)[2]


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with LayerNorms and StarCoder2's MLP; ``residual_dropout`` on each branch."""

    mlp_class: ClassVar[type[nnx.Module]] = Starcoder2MLP
    make_norm = staticmethod(_norm)


class Starcoder2Model(LlamaModel):
    """StarCoder2's decoder: ``embed_tokens`` (then ``embedding_dropout``), ``layers``, ``norm``."""

    layer_class: ClassVar[type[nnx.Module]] = Starcoder2DecoderLayer
    embedding_dropout: ClassVar[str] = "embedding_dropout"
    make_norm = staticmethod(_norm)


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
