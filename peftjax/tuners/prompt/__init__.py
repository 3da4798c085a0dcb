"""Prompt learning: prefix tuning, Cartridge, prompt tuning, multitask prompt tuning, P-tuning and CPT
(configs from ``peftjax.config``).

The model itself applies the adapter (its class gains a ``__call__`` that prepends the virtual
tokens), so ``PeftModel`` needs no forward/generate hooks.
"""

from peftjax.config import (
    CartridgeConfig,
    CPTConfig,
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)
from peftjax.tuners.prompt._cartridge import compose_cartridge_adapters, initialize_kv_prefix_from_text
from peftjax.tuners.prompt._model import (
    PROMPT_LEARNING_CONFIGS,
    PromptEncoder,
    cpt_scored_labels,
    inject_prompt_learning,
    virtual_positions,
)
from peftjax.tuners.prompt._state_dict import load_prompt_state_dict, prompt_state_dict

__all__ = [
    "CartridgeConfig",
    "compose_cartridge_adapters",
    "CPTConfig",
    "cpt_scored_labels",
    "initialize_kv_prefix_from_text",
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
