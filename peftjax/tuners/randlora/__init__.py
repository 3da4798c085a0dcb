"""RandLoRA: full-rank updates from shared frozen random bases (``RandLoraConfig`` from ``peftjax.config``)."""

from peftjax.config import RandLoraConfig
from peftjax.tuners.randlora._bases import randlora_bases
from peftjax.tuners.randlora._layer import RandLoraBasis, RandLoraLayer, RandLoraSpec
from peftjax.tuners.randlora._model import inject_randlora, load_randlora_state_dict, randlora_state_dict

__all__ = ["RandLoraBasis", "RandLoraConfig", "RandLoraLayer", "RandLoraSpec", "inject_randlora",
           "load_randlora_state_dict", "randlora_bases", "randlora_state_dict"]
