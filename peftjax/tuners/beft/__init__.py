"""BEFT: a trained bias on each targeted layer's output (``BeftConfig`` from ``peftjax.config``)."""

from peftjax.config import BeftConfig
from peftjax.tuners.beft._layer import BeftLayer, BeftSpec
from peftjax.tuners.beft._model import inject_beft

__all__ = ["BeftConfig", "BeftLayer", "BeftSpec", "inject_beft"]
