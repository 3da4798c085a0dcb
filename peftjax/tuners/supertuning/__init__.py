"""Super-Tuning: a weight's largest entries trained, optionally beside a LoRA (``SupertuningConfig``
from ``peftjax.config``)."""

from peftjax.config import SupertuningConfig
from peftjax.tuners.supertuning._layer import SupertuningLayer, SupertuningSpec, magnitude_support
from peftjax.tuners.supertuning._model import inject_supertuning

__all__ = ["SupertuningConfig", "SupertuningLayer", "SupertuningSpec", "inject_supertuning", "magnitude_support"]
