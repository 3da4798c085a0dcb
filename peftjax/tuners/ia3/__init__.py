"""(IA)³: learned vectors that rescale a layer's output or input (``IA3Config`` from ``peftjax.config``)."""

from peftjax.config import IA3Config
from peftjax.tuners.ia3._layer import IA3Layer, IA3Linear, IA3Spec
from peftjax.tuners.ia3._model import inject_ia3

__all__ = ["IA3Config", "IA3Layer", "IA3Linear", "IA3Spec", "inject_ia3"]
