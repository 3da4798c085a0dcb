"""Prompt learning: prefix tuning, prompt tuning, multitask prompt tuning and P-tuning (configs
from ``peftjax.config``).

The model itself applies the adapter (its class gains a ``__call__`` that prepends the virtual
tokens), so ``PeftModel`` needs no forward/generate hooks.
"""

from peftjax.config import MultitaskPromptTuningConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftjax.tuners.prompt._model import (
    PROMPT_LEARNING_CONFIGS,
    PromptEncoder,
    inject_prompt_learning,
    virtual_positions,
)
from peftjax.tuners.prompt._state_dict import load_prompt_state_dict, prompt_state_dict

__all__ = [
    "MultitaskPromptTuningConfig",
    "PROMPT_LEARNING_CONFIGS",
    "PrefixTuningConfig",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "inject_prompt_learning",
    "load_prompt_state_dict",
    "prompt_state_dict",
    "virtual_positions",
]
