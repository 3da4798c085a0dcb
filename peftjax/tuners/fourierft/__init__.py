"""FourierFT: weight updates trained in the Fourier domain (``FourierFTConfig`` from ``peftjax.config``)."""

from peftjax.config import FourierFTConfig
from peftjax.tuners.fourierft._layer import FourierFTLayer, FourierFTLinear, FourierIndices, FourierSpec
from peftjax.tuners.fourierft._model import fourier_indices, inject_fourierft

__all__ = [
    "FourierFTConfig",
    "FourierFTLayer",
    "FourierFTLinear",
    "FourierIndices",
    "FourierSpec",
    "fourier_indices",
    "inject_fourierft",
]
