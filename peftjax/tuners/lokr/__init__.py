"""LoKr (LyCORIS): a Kronecker product of two (optionally low-rank) factors as the weight update (``LoKrConfig``)."""

from peftjax.config import LoKrConfig
from peftjax.tuners.lokr._layer import LoKrLinear, factorization, kron_delta
from peftjax.tuners.lokr._model import inject_lokr

__all__ = ["LoKrConfig", "LoKrLinear", "factorization", "inject_lokr", "kron_delta"]
