"""``LNTuningConfig``: HF PEFT 0.22.0's LayerNorm-tuning config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, to_str_tuple


@dataclasses.dataclass(frozen=True, kw_only=True)
class LNTuningConfig(PeftConfig):
    """LN tuning: each targeted normalization layer trains its own full copy per adapter.

    The copy replaces the layer while its adapter is active; ``merge`` swaps the copy's weights
    into the layer (and the original into the adapter), as PEFT swaps the modules.

    Attributes:
        target_modules: Which norm layers (``nnx.LayerNorm`` / ``nnx.RMSNorm``); the syntax of
            ``LoraConfig.target_modules``. ``None`` means PEFT's default for the model type
            (Llama: ``input_layernorm``, ``post_attention_layernorm``, ``norm``; GPT-2: ``ln_1``,
            ``ln_2``, ``ln_f``; Qwen2/3: ``post_attention_layernorm``; BERT has none).
        exclude_modules: Modules never targeted, same syntax.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "LN_TUNING"

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
