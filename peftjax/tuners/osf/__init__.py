"""OSF: a weight's trailing singular subspace trained, its leading one frozen (``OSFConfig`` from ``peftjax.config``)."""

from peftjax.config import OSFConfig
from peftjax.tuners.osf._layer import OSFLayer, OSFSpec, orthogonal_gradient
from peftjax.tuners.osf._model import inject_osf

__all__ = ["OSFConfig", "OSFLayer", "OSFSpec", "inject_osf", "orthogonal_gradient"]
