"""Gemma 3 (text, ``model_type`` ``"gemma3_text"``) in Flax NNX: Gemma 2 with q/k norms and a RoPE per layer type.

What differs from Gemma 2 (``_gemma2``):

- ``q_norm`` and ``k_norm`` (Gemma's ``1 + weight`` RMSNorm over ``head_dim``) before RoPE;
- sliding layers rotate with ``rope_parameters["sliding_attention"]`` (transformers 4's
  ``rope_local_base_freq``, 10 000 by default), global ones with ``rope_parameters["full_attention"]``
  (``rope_theta`` and ``rope_scaling``; 1 000 000 by default);
- ``layer_types`` default to five sliding layers then a global one (``sliding_window_pattern``);
- no attention soft-capping: transformers 5's ``Gemma3Attention`` does not pass
  ``attn_logit_softcapping`` to its attention, so it has no effect there, nor here.

``Gemma3ForConditionalGeneration`` (the vision-language model) is not implemented.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._gemma2 import (
    Gemma2Attention,
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    Gemma2Model,
    GemmaRMSNorm,
)
from peftjax.models._llama import head_dim_of
from peftjax.models._layer_kinds import rope_parameters_by_type, rotary_of
from peftjax.models._rope import RotaryEmbedding
from peftjax.models._vision_language import TextOfVisionLanguage

DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def gemma3_rope_parameters(config) -> dict[str, dict]:
    """``{layer type: RoPE parameters}``, as ``Gemma3TextConfig`` derives them.

    Reads transformers 5's per-type ``rope_parameters`` and transformers 4's ``rope_theta``,
    ``rope_local_base_freq`` and ``rope_scaling`` (the latter applies to global layers only).

    Raises:
      ValueError: ``rope_parameters`` that is not keyed by layer type.
    """
    return rope_parameters_by_type(config, DEFAULT_THETA, {"full_attention": "rope_theta",
                                                           "sliding_attention": "rope_local_base_freq"})


class Gemma3Attention(Gemma2Attention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw = dict(epsilon=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = GemmaRMSNorm(self.head_dim, **kw)
        self.k_norm = GemmaRMSNorm(self.head_dim, **kw)

    @staticmethod
    def logit_softcap(config) -> float | None:
        return None  # see the module docstring

    def project(self, x):
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Gemma3Attention


class Gemma3TextModel(Gemma2Model):
    layer_class: ClassVar[type[nnx.Module]] = Gemma3DecoderLayer

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        gemma3_rope_parameters(config)  # a bad RoPE setting fails before any weight is built
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def rotary_for(config, layer_type: str) -> RotaryEmbedding:
        return rotary_of(config, gemma3_rope_parameters(config)[layer_type], head_dim_of(config))


class Gemma3ForCausalLM(TextOfVisionLanguage, Gemma2ForCausalLM):
    """Gemma 3 text: Gemma 2 with q/k norms and local/global RoPE bases (no final soft-cap by default);
    reads the text model of a ``Gemma3ForConditionalGeneration`` checkpoint too (the Hub's 4B and up)."""

    model_class: ClassVar[type[nnx.Module]] = Gemma3TextModel


class Gemma3TextForSequenceClassification(TextOfVisionLanguage, Gemma2ForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Gemma3TextModel


register(Gemma3ForCausalLM, model_types=("gemma3_text",), default=True)
register(Gemma3TextForSequenceClassification)
