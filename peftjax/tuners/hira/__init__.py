"""HiRA: the frozen weight modulated by a low-rank matrix, ``W ⊙ (B A)`` (``HiraConfig`` from ``peftjax.config``)."""

from peftjax.config import HiraConfig
from peftjax.tuners.hira._layer import HiraEmbed, HiraLayer, HiraLinear, HiraSpec
from peftjax.tuners.hira._model import inject_hira

__all__ = ["HiraConfig", "HiraEmbed", "HiraLayer", "HiraLinear", "HiraSpec", "inject_hira"]
