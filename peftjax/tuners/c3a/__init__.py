"""C3A: block-circulant updates run as circular convolutions (``C3AConfig`` from ``peftjax.config``)."""

from peftjax.config import C3AConfig
from peftjax.tuners.c3a._layer import C3ALayer, C3ASpec, block_circular, circulant_delta
from peftjax.tuners.c3a._model import inject_c3a

__all__ = ["C3AConfig", "C3ALayer", "C3ASpec", "block_circular", "circulant_delta", "inject_c3a"]
