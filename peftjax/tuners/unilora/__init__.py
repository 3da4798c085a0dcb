"""Uni-LoRA: every LoRA factor entry read from one trained vector (``UniLoraConfig`` from ``peftjax.config``)."""

from peftjax.config import UniLoraConfig
from peftjax.tuners.unilora._layer import UniLoraLayer, UniLoraSpec, unilora_index
from peftjax.tuners.unilora._model import inject_unilora, load_unilora_state_dict, unilora_state_dict

__all__ = ["UniLoraConfig", "UniLoraLayer", "UniLoraSpec", "inject_unilora", "load_unilora_state_dict",
           "unilora_index", "unilora_state_dict"]
