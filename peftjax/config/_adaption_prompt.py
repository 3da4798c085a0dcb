"""``AdaptionPromptConfig``: HF PEFT 0.22.0's adaption-prompt (LLaMA-Adapter) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from peftjax.config._base import PeftConfig, check_int, check_optional_str

# model_type -> the attention submodule PEFT 0.22.0 wraps (its TRANSFORMERS_MODEL_CONFIG); PEFT
# supports no other model type, and neither does peftjax
ADAPTION_PROMPT_TARGET_MODULES: dict[str, str] = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaptionPromptConfig(PeftConfig):
    """Adaption prompts (LLaMA-Adapter, Zhang et al. 2023): a learned, gated prompt per top layer.

    Each of the top ``adapter_layers`` attention modules gets ``adaption_prompt``
    ``[1, adapter_len, hidden]`` (standard normal init) and ``adaption_gate`` ``[1]`` (zero init, so
    the adapter starts as a no-op). The layer's own key/value projections turn the prompt into keys
    and values that every query attends to (no mask, no RoPE on the prompt); the result, scaled by
    the gate, is added to the attention output.

    Attributes:
        target_modules: The name of the attention submodules to wrap (a single str, not a list);
            ``None`` means PEFT's name for the model type (``"self_attn"`` for Llama and Mistral,
            ``"attn"`` for GPT-2), which is written into the saved config.
        adapter_len: The number of prompt tokens per layer. Required (an int >= 1).
        adapter_layers: How many layers, counted from the top, get a prompt. Required (an int >= 1,
            at most the number of layers).
        modules_to_save: Not a field of PEFT's config (it is not written); must stay ``None``.

    Example:
        >>> AdaptionPromptConfig(adapter_len=10, adapter_layers=2).to_dict()["peft_type"]
        'ADAPTION_PROMPT'
    """

    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_str("target_modules", self.target_modules)
        check_int("adapter_len", self.adapter_len, minimum=1, optional=True)
        check_int("adapter_layers", self.adapter_layers, minimum=1, optional=True)
        if self.modules_to_save is not None:
            raise ValueError("AdaptionPromptConfig has no modules_to_save (PEFT's has none); only the adaption "
                             "prompts and gates train.")

    def to_dict(self) -> dict[str, Any]:
        """The fields PEFT 0.22.0 writes for the method (``modules_to_save`` is not one of them)."""
        out = super().to_dict()
        del out["modules_to_save"]
        return out
