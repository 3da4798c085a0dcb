"""EleutherAI's GPT-Neo (``model_type`` ``"gpt_neo"``: GPT-Neo 125M, 1.3B, 2.7B) in Flax NNX, with
transformers' module names.

GPTBigCode's decoder (``transformer``: ``wte`` plus learned positions ``wpe``, GPT-2's blocks
``h``, ``ln_f``, a tied head) with GPT-Neo's attention:

- each block's ``attn.attention`` holds ``q_proj``, ``k_proj``, ``v_proj`` (no biases) and a biased
  ``out_proj``; the scores are not scaled (no ``1/sqrt(head_dim)``);
- layers alternate by ``attention_layers`` (from ``attention_types``): ``global`` attend to every
  earlier token, ``local`` to the last ``window_size`` tokens only;
- dropouts ``embed_dropout``, ``attention_dropout`` and ``resid_dropout``; the MLP
  ``c_proj(act(c_fc(x)))``, ``intermediate_size`` wide (4x the hidden size by default).
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._gpt_bigcode import GPTBigCodeBlock, GPTBigCodeMLP, GPTBigCodeModel
from peftjax.models._llama import (
    DecoderUnderPrefix,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)


def attention_layers(attention_types) -> list[str]:
    """GPTNeoConfig's ``attention_layers`` from ``attention_types`` (``[[["global", "local"], 12]]``:
    the pattern repeated 12 times)."""
    return [kind for pattern, repeats in attention_types for _ in range(repeats) for kind in pattern]


class GPTNeoSelfAttention(LlamaAttention):
    """``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; unscaled scores over a global or local window."""

    out_name: ClassVar[str] = "out_proj"

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.scale = 1.0


class GPTNeoAttention(nnx.Module):
    """transformers' wrapper: the layer's attention is ``attn.attention``."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.attention = GPTNeoSelfAttention(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, *args):
        return self.attention(*args)


class GPTNeoMLP(GPTBigCodeMLP):
    @staticmethod
    def width(config) -> int:
        return getattr(config, "intermediate_size", None) or 4 * config.hidden_size


class GPTNeoBlock(GPTBigCodeBlock):
    attention_class: ClassVar[type[nnx.Module]] = GPTNeoAttention
    mlp_class: ClassVar[type[nnx.Module]] = GPTNeoMLP
    residual_dropout: ClassVar[str] = "resid_dropout"


class GPTNeoModel(GPTBigCodeModel):
    """GPT-Neo's decoder: ``wte`` and ``wpe`` (then ``embed_dropout``), ``h``, ``ln_f``."""

    layer_class: ClassVar[type[nnx.Module]] = GPTNeoBlock
    embedding_dropout: ClassVar[str] = "embed_dropout"

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kinds = list(config.attention_layers)
        unknown = sorted(set(kinds) - {"global", "local"})
        if unknown:
            raise ValueError(f"gpt_neo: attention_layers {unknown} are not supported; supported: ['global', 'local']")
        if len(kinds) != config.num_hidden_layers:
            raise ValueError(f"gpt_neo: attention_layers has {len(kinds)} entries for num_layers="
                             f"{config.num_hidden_layers} (transformers refuses it too)")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class _UnderTransformer(DecoderUnderPrefix):
    base_model_prefix: ClassVar[str] = "transformer"
    model_class: ClassVar[type[nnx.Module]] = GPTNeoModel


class GPTNeoForCausalLM(_UnderTransformer, LlamaForCausalLM):
    """GPT-Neo: ``transformer`` and the LM head (tied to ``wte`` by default)."""


class GPTNeoForSequenceClassification(_UnderTransformer, LlamaForSequenceClassification):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class GPTNeoForTokenClassification(_UnderTransformer, LlamaForTokenClassification):
    """Token classification: the decoder, dropout (``classifier_dropout``) and a biased
    ``classifier`` on every token."""

    head_name: ClassVar[str] = "classifier"
    optional_keys: ClassVar[tuple[str, ...]] = (r"classifier\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


class GPTNeoForQuestionAnswering(_UnderTransformer, LlamaForQuestionAnswering):
    ignored_keys: ClassVar[tuple[str, ...]] = (r"lm_head\.weight",)


register(GPTNeoForCausalLM, model_types=("gpt_neo",), default=True)
register(GPTNeoForSequenceClassification)
register(GPTNeoForTokenClassification)
register(GPTNeoForQuestionAnswering)
