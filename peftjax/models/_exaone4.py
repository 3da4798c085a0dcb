"""LG AI Research's EXAONE 4.0 (``model_type`` ``"exaone4"``: EXAONE-4.0-1.2B, 32B) in Flax NNX,
with transformers' module names.

OLMo 2's layers (the norms after each branch: ``post_attention_layernorm``,
``post_feedforward_layernorm``; no input norm) with Qwen3's attention (``q_norm``/``k_norm`` per
head, before RoPE; no biases), and OLMo 3's hybrid of layer types: by ``layer_types`` (every
``sliding_window_pattern``-th layer global by default) a layer attends within ``sliding_window``
with RoPE, or to everything, without RoPE where a window is configured (with RoPE where none is).
The layers differ only in mask and RoPE (``_layer_kinds``), so ``scan_layers=True`` stacks them.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._layer_kinds import LayerKindsModel, checked_layer_types
from peftjax.models._llama import (
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from peftjax.models._olmo import Olmo2DecoderLayer
from peftjax.models._qwen3 import Qwen3Attention


def exaone4_layer_types(config) -> list[str]:
    """``Exaone4Config``'s layer types: every ``sliding_window_pattern``-th layer full, the others
    sliding; all full without a window."""
    if config.sliding_window is None or not config.sliding_window_pattern:
        return ["full_attention"] * config.num_hidden_layers
    every = int(config.sliding_window_pattern)
    return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(config.num_hidden_layers)]


class Exaone4Attention(Qwen3Attention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window = None  # the decoder passes each layer its own mask


class Exaone4DecoderLayer(Olmo2DecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Exaone4Attention


class Exaone4Model(LayerKindsModel):
    """OLMo 2's layers with per-head q/k norms; sliding layers with RoPE, full ones without
    (where a window is configured)."""

    layer_class: ClassVar[type[nnx.Module]] = Exaone4DecoderLayer

    def layer_kinds_of(self, config):
        kinds = checked_layer_types(config)
        if "sliding_attention" in kinds and config.sliding_window is None:
            raise ValueError("exaone4: layer_types has sliding_attention layers but sliding_window is None")
        rope = LlamaModel.make_rotary(config)
        nope = config.sliding_window is not None  # transformers: RoPE in full layers only without a window
        return kinds, tuple((k, None if nope and k == "full_attention" else rope,
                             config.sliding_window if k == "sliding_attention" else None) for k in sorted(set(kinds)))


class Exaone4ForCausalLM(LlamaForCausalLM):
    """EXAONE 4.0: OLMo 2's post-norm layers, per-head q/k norms, sliding RoPE and global NoPE layers."""

    model_class: ClassVar[type[nnx.Module]] = Exaone4Model


class Exaone4ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Exaone4Model


class Exaone4ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Exaone4Model


class Exaone4ForQuestionAnswering(LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = Exaone4Model


register(Exaone4ForCausalLM, model_types=("exaone4",), default=True)
for _cls in (Exaone4ForSequenceClassification, Exaone4ForTokenClassification, Exaone4ForQuestionAnswering):
    register(_cls)
