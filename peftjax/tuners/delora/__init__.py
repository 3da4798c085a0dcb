"""DeLoRA: a low-rank update with a bounded norm (``DeloraConfig`` from ``peftjax.config``)."""

from peftjax.config import DeloraConfig
from peftjax.tuners.delora._layer import DeloraLayer, DeloraSpec, delora_scaling
from peftjax.tuners.delora._model import inject_delora

__all__ = ["DeloraConfig", "DeloraLayer", "DeloraSpec", "delora_scaling", "inject_delora"]
