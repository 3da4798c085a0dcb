"""HRA: Householder reflection adaptation (``HRAConfig`` from ``peftjax.config``)."""

from peftjax.config import HRAConfig
from peftjax.tuners.hra._layer import HRALayer, HRASpec, gram_schmidt, reflect
from peftjax.tuners.hra._model import inject_hra

__all__ = ["HRAConfig", "HRALayer", "HRASpec", "gram_schmidt", "inject_hra", "reflect"]
