"""LN tuning: trained copies of the normalization layers (``LNTuningConfig`` from ``peftjax.config``)."""

from peftjax.config import LNTuningConfig
from peftjax.tuners.ln_tuning._layer import LNTuningLayer, LNTuningNorm
from peftjax.tuners.ln_tuning._model import inject_ln_tuning

__all__ = ["LNTuningConfig", "LNTuningLayer", "LNTuningNorm", "inject_ln_tuning"]
