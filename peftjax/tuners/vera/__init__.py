"""VeRA: shared frozen random projections and trained scaling vectors (``VeraConfig`` from ``peftjax.config``),
and PVeRA, its probabilistic variant (``PveraConfig``)."""

from peftjax.config import PveraConfig, VeraConfig
from peftjax.tuners.vera._layer import PveraLinear, VeraLayer, VeraLinear, VeraProjection, VeraSpec
from peftjax.tuners.vera._model import (
    inject_pvera,
    inject_vera,
    load_vera_state_dict,
    vera_projections,
    vera_state_dict,
)

__all__ = [
    "PveraConfig",
    "PveraLinear",
    "inject_pvera",
    "VeraConfig",
    "VeraLayer",
    "VeraLinear",
    "VeraProjection",
    "VeraSpec",
    "inject_vera",
    "load_vera_state_dict",
    "vera_projections",
    "vera_state_dict",
]
