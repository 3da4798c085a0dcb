"""PEANuT: a weight update a small trained network computes from the weight (``PeanutConfig`` from ``peftjax.config``)."""

from peftjax.config import PeanutConfig
from peftjax.tuners.peanut._layer import PeanutLayer, PeanutSpec
from peftjax.tuners.peanut._model import inject_peanut

__all__ = ["PeanutConfig", "PeanutLayer", "PeanutSpec", "inject_peanut"]
