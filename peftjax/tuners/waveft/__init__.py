"""WaveFT: weight updates trained in the wavelet domain (``WaveFTConfig`` from ``peftjax.config``)."""

from peftjax.config import WaveFTConfig
from peftjax.tuners.waveft._layer import WaveFTLayer, WaveFTLinear, WaveFTSpec, WaveletIndices, waveft_delta
from peftjax.tuners.waveft._model import inject_waveft, n_frequencies

__all__ = [
    "WaveFTConfig",
    "WaveFTLayer",
    "WaveFTLinear",
    "WaveFTSpec",
    "WaveletIndices",
    "inject_waveft",
    "n_frequencies",
    "waveft_delta",
]
