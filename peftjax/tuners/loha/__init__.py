"""LoHa (LyCORIS): a Hadamard product of two low-rank products as the weight update (``LoHaConfig``)."""

from peftjax.config import LoHaConfig
from peftjax.tuners.loha._layer import LoHaLinear, hadamard_delta
from peftjax.tuners.loha._model import inject_loha

__all__ = ["LoHaConfig", "LoHaLinear", "hadamard_delta", "inject_loha"]
