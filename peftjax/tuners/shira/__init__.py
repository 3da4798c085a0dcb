"""SHiRA: sparse high-rank updates at fixed positions (``ShiraConfig`` from ``peftjax.config``)."""

from peftjax.config import ShiraConfig
from peftjax.tuners.shira._layer import ShiraLayer, ShiraSpec, SparseIndices, sparse_delta
from peftjax.tuners.shira._model import inject_shira, random_mask

__all__ = ["ShiraConfig", "ShiraLayer", "ShiraSpec", "SparseIndices", "inject_shira", "random_mask", "sparse_delta"]
