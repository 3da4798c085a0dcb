"""RoAd: 2D rotary adaptation of a layer's outputs (``RoadConfig`` from ``peftjax.config``)."""

from peftjax.config import RoadConfig
from peftjax.tuners.road._layer import RoadLayer, RoadSpec, apply_road, road_columns
from peftjax.tuners.road._model import inject_road

__all__ = ["RoadConfig", "RoadLayer", "RoadSpec", "apply_road", "inject_road", "road_columns"]
