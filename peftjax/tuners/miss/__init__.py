"""MiSS (formerly Bone): a block shared by every shard of a weight (``MissConfig`` from ``peftjax.config``)."""

from peftjax.config import MissConfig
from peftjax.tuners.miss._layer import MissLayer, MissSpec, bat_update, shard_sum
from peftjax.tuners.miss._model import inject_miss

__all__ = ["MissConfig", "MissLayer", "MissSpec", "bat_update", "inject_miss", "shard_sum"]
