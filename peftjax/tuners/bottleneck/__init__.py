"""Bottleneck adapters (Houlsby, Pfeiffer), peftjax-only (``BottleneckConfig`` from ``peftjax.config``)."""

from peftjax.config import BottleneckConfig
from peftjax.tuners.bottleneck._layer import BottleneckLayer, BottleneckLinear, BottleneckSpec
from peftjax.tuners.bottleneck._model import BOTTLENECK_TARGET_MODULES, default_target_modules, inject_bottleneck

__all__ = [
    "BOTTLENECK_TARGET_MODULES",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckLinear",
    "BottleneckSpec",
    "default_target_modules",
    "inject_bottleneck",
]
