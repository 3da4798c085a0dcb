"""Registers peftjax's built-in PEFT methods with the tuner registry (imported lazily)."""

from peftjax.config import LoraConfig
from peftjax.io._lora_format import load_lora_state_dict, lora_state_dict
from peftjax.tuners._lora import inject_lora
from peftjax.tuners._registry import Tuner, register_tuner

register_tuner(Tuner(LoraConfig, inject=inject_lora, state_dict=lora_state_dict, load_state_dict=load_lora_state_dict))

from peftjax.config import BottleneckConfig, IA3Config  # noqa: E402
from peftjax.tuners._bottleneck import bottleneck_state_dict, inject_bottleneck, load_bottleneck_state_dict  # noqa: E402
from peftjax.tuners._ia3 import ia3_state_dict, inject_ia3, load_ia3_state_dict  # noqa: E402

register_tuner(Tuner(IA3Config, inject=inject_ia3, state_dict=ia3_state_dict, load_state_dict=load_ia3_state_dict))
register_tuner(Tuner(BottleneckConfig, inject=inject_bottleneck, state_dict=bottleneck_state_dict,
                     load_state_dict=load_bottleneck_state_dict))

# prompt learning (prefix tuning, prompt tuning, P-tuning): the model itself applies the adapter,
# so PeftModel needs no forward/generate hooks
from peftjax.tuners._prompt import (  # noqa: E402
    PROMPT_LEARNING_CONFIGS,
    inject_prompt_learning,
    load_prompt_state_dict,
    prompt_state_dict,
)

for _config_class in PROMPT_LEARNING_CONFIGS:
    register_tuner(Tuner(_config_class, inject=inject_prompt_learning, state_dict=prompt_state_dict,
                         load_state_dict=load_prompt_state_dict))
