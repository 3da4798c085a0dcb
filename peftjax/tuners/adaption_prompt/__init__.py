"""Adaption prompts (LLaMA-Adapter): gated learned prompts in the top attention layers (``AdaptionPromptConfig``)."""

from peftjax.config import AdaptionPromptConfig
from peftjax.tuners.adaption_prompt._layer import (
    AdaptedGPT2Attention,
    AdaptedLlamaAttention,
    AdaptionPromptLayer,
    AdaptionPromptSpec,
)
from peftjax.tuners.adaption_prompt._model import inject_adaption_prompt, resolve_adaption_prompt_config

__all__ = [
    "AdaptedGPT2Attention",
    "AdaptedLlamaAttention",
    "AdaptionPromptConfig",
    "AdaptionPromptLayer",
    "AdaptionPromptSpec",
    "inject_adaption_prompt",
    "resolve_adaption_prompt_config",
]
