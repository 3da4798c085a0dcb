"""OFT: orthogonal fine-tuning by block-diagonal Cayley rotations (``OFTConfig`` from ``peftjax.config``)."""

from peftjax.config import OFTConfig
from peftjax.tuners.oft._layer import OFTEmbed, OFTLayer, OFTLinear, OFTSpec
from peftjax.tuners.oft._model import inject_oft

__all__ = ["OFTConfig", "OFTEmbed", "OFTLayer", "OFTLinear", "OFTSpec", "inject_oft"]
