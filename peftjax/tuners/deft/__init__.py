"""DEFT: a subspace of a layer's output replaced by a trained one (``DeftConfig`` from ``peftjax.config``)."""

from peftjax.config import DeftConfig
from peftjax.tuners.deft._layer import DeftLayer, DeftSpec, deft_projection
from peftjax.tuners.deft._model import inject_deft

__all__ = ["DeftConfig", "DeftLayer", "DeftSpec", "deft_projection", "inject_deft"]
