"""GraLoRA: a LoRA of ``k x k`` blocks, each with its own low-rank pair (``GraloraConfig`` from ``peftjax.config``)."""

from peftjax.config import GraloraConfig
from peftjax.tuners.gralora._layer import GraloraLayer, GraloraSpec, granular, granular_delta
from peftjax.tuners.gralora._model import inject_gralora

__all__ = ["GraloraConfig", "GraloraLayer", "GraloraSpec", "granular", "granular_delta", "inject_gralora"]
