"""BOFT: butterfly orthogonal fine-tuning (``BOFTConfig`` from ``peftjax.config``)."""

from peftjax.config import BOFTConfig
from peftjax.tuners.boft._layer import BOFTLayer, BOFTSpec
from peftjax.tuners.boft._model import inject_boft

__all__ = ["BOFTConfig", "BOFTLayer", "BOFTSpec", "inject_boft"]
