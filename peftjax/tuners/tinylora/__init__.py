"""TinyLoRA: a LoRA-XS middle made of a tiny trained vector (``TinyLoraConfig`` from ``peftjax.config``)."""

from peftjax.config import TinyLoraConfig
from peftjax.tuners.tinylora._layer import TinyLoraLayer, TinyLoraSpec
from peftjax.tuners.tinylora._model import inject_tinylora, load_tinylora_state_dict, tinylora_state_dict

__all__ = ["TinyLoraConfig", "TinyLoraLayer", "TinyLoraSpec", "inject_tinylora", "load_tinylora_state_dict",
           "tinylora_state_dict"]
