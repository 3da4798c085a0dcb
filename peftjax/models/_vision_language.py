"""Vision-language checkpoints read as their text model.

The Hub's Qwen3.5, Gemma 3 (4B and up) and Gemma 4 releases are vision-language checkpoints: their
``config.json`` holds the text model's config under ``text_config`` (read instead:
``TEXT_OF_VISION_LANGUAGE`` in ``_config.py``) and their files the text decoder under
``model.language_model.*`` (transformers 5's layout) or ``language_model.model.*`` (the layout
transformers still writes for Gemma 3), beside vision and audio towers. A text class with
:class:`TextOfVisionLanguage` reads such a file as its own (the towers skipped) and records the
layout, so that its adapters carry the module names PEFT gives them on the vision-language class
(``model.language_model.layers.0.self_attn.q_proj``): PEFT's adapters of the Hub model load here,
and peftjax's load in PEFT on it.
"""

from __future__ import annotations

from typing import ClassVar

# (the checkpoint's prefix, the text model's)
TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
# what a vision-language checkpoint holds beside its text model (and Qwen3.5's multi-token predictor)
NOT_TEXT = (r"(model\.)?(visual|vision_tower|vision_model|multi_modal_projector|audio_tower|embed_vision|"
            r"embed_audio)\..*", r"mtp\..*")
# the text model's module paths as transformers 5's vision-language classes name them (their adapters'
# keys): the decoder under model.language_model (Gemma 3, Gemma 4, Qwen3.5)
VISION_LANGUAGE_NAMES = {r"^model\.": "model.language_model."}


def text_key(key: str) -> str:
    """A vision-language checkpoint's ``key`` as the text model's."""
    for old, new in TEXT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


class TextOfVisionLanguage:
    """Mixin for a text model class: reads a vision-language checkpoint's text model too.

    Attributes:
      vision_language_names: how the vision-language class names the text model's modules
        (a ``key_mapping``).
      adapter_key_mapping: set when the weights came from a vision-language checkpoint: that
        mapping, the ``key_mapping`` its adapters get by default (``get_peft_model``,
        ``PeftModel.from_pretrained``).
    """

    ignored_keys: ClassVar[tuple[str, ...]] = (r".*rotary_emb\..*inv_freq", *NOT_TEXT)
    vision_language_names: ClassVar[dict[str, str]] = VISION_LANGUAGE_NAMES

    def _align_prefix(self, keys: set[str], expected: set[str]) -> dict[str, str]:
        if not any(k.startswith(old) for k in keys for old, _ in TEXT_PREFIXES):
            return super()._align_prefix(keys, expected)
        self.adapter_key_mapping = self.vision_language_names
        renamed = {k: text_key(k) for k in keys}
        inner = super()._align_prefix(set(renamed.values()), expected)
        return {k: inner[v] for k, v in renamed.items()}
