"""VB-LoRA: LoRA factors from one shared, trained vector bank (``VBLoRAConfig`` from ``peftjax.config``)."""

from peftjax.config import VBLoRAConfig
from peftjax.tuners.vblora._layer import VBLoRALayer, VBLoRASpec, mix
from peftjax.tuners.vblora._model import inject_vblora, load_vblora_state_dict, vblora_state_dict

__all__ = ["VBLoRAConfig", "VBLoRALayer", "VBLoRASpec", "inject_vblora", "load_vblora_state_dict", "mix",
           "vblora_state_dict"]
