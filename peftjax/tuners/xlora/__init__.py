"""X-LoRA: a mixture of LoRA experts weighed per token (``XLoraConfig`` from ``peftjax.config``)."""

from peftjax.config import XLoraConfig
from peftjax.tuners.xlora._model import (
    XLoraClassifier,
    XLoraModel,
    inject_xlora,
    load_xlora_state_dict,
    xlora_state_dict,
)

__all__ = ["XLoraClassifier", "XLoraConfig", "XLoraModel", "inject_xlora", "load_xlora_state_dict",
           "xlora_state_dict"]
