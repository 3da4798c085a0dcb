"""Registers peftjax's built-in PEFT methods with the tuner registry (imported lazily)."""

from peftjax.config import LoraConfig
from peftjax.io._lora_format import load_lora_state_dict, lora_state_dict
from peftjax.tuners._lora import inject_lora
from peftjax.tuners._registry import Tuner, register_tuner

register_tuner(Tuner(LoraConfig, inject=inject_lora, state_dict=lora_state_dict, load_state_dict=load_lora_state_dict))
