"""Poly (Polytropon) and multi-head routing: per-task mixtures of LoRA skills (``PolyConfig`` from ``peftjax.config``)."""

from peftjax.config import PolyConfig
from peftjax.tuners.poly._layer import PolyLayer, PolySpec, mixing_weights
from peftjax.tuners.poly._model import inject_poly
from peftjax.tuners.poly._tasks import current_task_ids

__all__ = ["PolyConfig", "PolyLayer", "PolySpec", "current_task_ids", "inject_poly", "mixing_weights"]
