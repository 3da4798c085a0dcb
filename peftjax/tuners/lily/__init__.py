"""LiLy: low-rank projections shared across layers, mixed by per-layer routers (``LilyConfig`` from ``peftjax.config``)."""

from peftjax.config import LilyConfig
from peftjax.tuners.lily._layer import LilyLayer, LilySpec
from peftjax.tuners.lily._model import inject_lily

__all__ = ["LilyConfig", "LilyLayer", "LilySpec", "inject_lily"]
