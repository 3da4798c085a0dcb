"""What LyCORIS methods (LoHa, LoKr) share: the layer's forward, dropouts and merge, and the targeting."""

from peftjax.config import LycorisConfig
from peftjax.tuners.lycoris._layer import LycorisLayer, LycorisSpec, kaiming_uniform, rank_dropout_mask
from peftjax.tuners.lycoris._model import inject_lycoris

__all__ = ["LycorisConfig", "LycorisLayer", "LycorisSpec", "inject_lycoris", "kaiming_uniform", "rank_dropout_mask"]
