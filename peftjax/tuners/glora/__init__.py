"""GLoRA: the frozen weight and bias scaled and shifted by trained terms (``GloraConfig`` from ``peftjax.config``)."""

from peftjax.config import GloraConfig
from peftjax.tuners.glora._layer import GloraLayer, GloraSpec
from peftjax.tuners.glora._model import inject_glora

__all__ = ["GloraConfig", "GloraLayer", "GloraSpec", "inject_glora"]
