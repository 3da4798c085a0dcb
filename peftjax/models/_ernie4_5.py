"""Baidu ERNIE 4.5 (dense, ``model_type`` ``"ernie4_5"``) in Flax NNX: Llama with GLM's pairwise RoPE.

Against Llama: RoPE turns adjacent pairs of dimensions (``(2i, 2i + 1)`` by frequency ``i``, as
GLM's), over the whole head; ``use_bias`` puts a bias on every projection (attention and MLP);
the embeddings are tied by default. transformers has only the causal LM for this family.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._glm4 import Glm4Attention
from peftjax.models._llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Ernie4_5DecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Glm4Attention  # the pairwise rotation


class Ernie4_5Model(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = Ernie4_5DecoderLayer


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    """ERNIE 4.5: pairwise RoPE, biases everywhere with ``use_bias``."""

    model_class: ClassVar[type[nnx.Module]] = Ernie4_5Model


register(Ernie4_5ForCausalLM, model_types=("ernie4_5",), default=True)
