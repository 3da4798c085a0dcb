"""ByteDance Seed-OSS (``model_type`` ``"seed_oss"``) in Flax NNX: Llama with its own biases and dropout.

- the query, key and value projections carry a bias by ``attention_bias`` (on by default), the
  output projection by ``attention_out_bias`` (off), the MLP's by ``mlp_bias``;
- ``residual_dropout`` drops each branch's output before its residual add while training (the
  attention's after ``o_proj``, the MLP's after ``down_proj``), as the decoder's ``resid_pdrop``
  does for Phi-3, beside ``attention_dropout`` on the attention weights;
- an explicit ``head_dim`` (128 in the releases, with 80 query heads of a 5,120-wide model).
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)


class SeedOssModel(LlamaModel):
    """Llama's decoder stack; the biases and dropout are read from the config by the shared layers."""


class SeedOssForCausalLM(LlamaForCausalLM):
    model_class: ClassVar[type[nnx.Module]] = SeedOssModel


class SeedOssForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = SeedOssModel


class SeedOssForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = SeedOssModel


class SeedOssForQuestionAnswering(LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = SeedOssModel


register(SeedOssForCausalLM, model_types=("seed_oss",), default=True)
register(SeedOssForSequenceClassification)
register(SeedOssForTokenClassification)
register(SeedOssForQuestionAnswering)
