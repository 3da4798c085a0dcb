"""VeRA: shared frozen random projections and trained scaling vectors (``VeraConfig`` from ``peftjax.config``)."""

from peftjax.config import VeraConfig
from peftjax.tuners.vera._layer import VeraLayer, VeraLinear, VeraProjection, VeraSpec
from peftjax.tuners.vera._model import inject_vera, load_vera_state_dict, vera_projections, vera_state_dict

__all__ = [
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
