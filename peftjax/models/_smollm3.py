"""SmolLM3 (Hugging Face's 3B) in Flax NNX: the Llama decoder with RoPE left out of some layers.

What differs from Llama:

- ``no_rope_layers[i]`` is 1 where layer ``i`` rotates its queries and keys and 0 where it does
  not (NoPE): by default every ``no_rope_layer_interval``-th layer (the 4th, 8th, ...) has no RoPE;
- ``layer_types`` may make layers slide (by default, with ``use_sliding_window`` and a
  ``sliding_window``, the NoPE ones): a sliding layer attends within ``sliding_window``, as
  transformers' mask for it does;
- RoPE's default base is 2 000 000 and the embeddings are tied by default.

The layers differ only in their mask and RoPE, which the decoder hands them (``_layer_kinds``):
``scan_layers=True`` stacks them all.
"""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from peftjax.models._auto import register
from peftjax.models._layer_kinds import LAYER_TYPES, LayerKindsModel
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)


def layer_kinds(config) -> tuple[str, ...]:
    """Each layer's kind, ``"<layer type>/rope"`` or ``"<layer type>/nope"``, checked.

    Raises:
      ValueError: ``layer_types`` or ``no_rope_layers`` of another length than
        ``num_hidden_layers``, an unknown layer type, or sliding layers without a ``sliding_window``.
    """
    n = config.num_hidden_layers
    types, rope = tuple(config.layer_types), tuple(config.no_rope_layers)
    for name, found in (("layer_types", types), ("no_rope_layers", rope)):
        if len(found) != n:
            raise ValueError(f"smollm3: {name} has {len(found)} entries for num_hidden_layers={n}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"smollm3: layer_types {unknown} are not supported; supported: {list(LAYER_TYPES)}")
    if "sliding_attention" in types and config.sliding_window is None:
        raise ValueError("smollm3: layer_types has sliding_attention layers but sliding_window is None")
    return tuple(f"{t}/{'rope' if r else 'nope'}" for t, r in zip(types, rope))


class SmolLM3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window = None  # the decoder passes each layer its own mask (and its RoPE, or none)


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = SmolLM3Attention


class SmolLM3Model(LayerKindsModel):
    """Llama's decoder whose layers each take their kind's window and RoPE (or none)."""

    layer_class: ClassVar[type[nnx.Module]] = SmolLM3DecoderLayer

    def layer_kinds_of(self, config):
        kinds, rope = layer_kinds(config), LlamaModel.make_rotary(config)
        return kinds, tuple((k, rope if k.endswith("/rope") else None,
                             config.sliding_window if k.startswith("sliding_attention") else None)
                            for k in sorted(set(kinds)))


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """SmolLM3: Llama with RoPE left out of some layers (NoPE)."""

    model_class: ClassVar[type[nnx.Module]] = SmolLM3Model


class SmolLM3ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = SmolLM3Model


class SmolLM3ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = SmolLM3Model


class SmolLM3ForQuestionAnswering(LlamaForQuestionAnswering):
    model_class: ClassVar[type[nnx.Module]] = SmolLM3Model


register(SmolLM3ForCausalLM, model_types=("smollm3",), default=True)
register(SmolLM3ForSequenceClassification)
register(SmolLM3ForTokenClassification)
register(SmolLM3ForQuestionAnswering)
