"""FRoD: each weight rewritten in a basis its kind of layer shares, a diagonal and a few sparse
entries trained there (``FrodConfig`` from ``peftjax.config``)."""

from peftjax.config import FrodConfig
from peftjax.tuners.frod._layer import FrodBasis, FrodLayer, FrodShared, FrodSpec
from peftjax.tuners.frod._model import (
    frod_kind,
    frod_layer_index,
    frod_state_dict,
    inject_frod,
    joint_basis,
    load_frod_state_dict,
)

__all__ = [
    "FrodBasis",
    "FrodConfig",
    "FrodLayer",
    "FrodShared",
    "FrodSpec",
    "frod_kind",
    "frod_layer_index",
    "frod_state_dict",
    "inject_frod",
    "joint_basis",
    "load_frod_state_dict",
]
