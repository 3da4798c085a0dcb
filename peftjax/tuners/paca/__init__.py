"""PaCA: a few input columns of each targeted weight trained in place (``PacaConfig`` from ``peftjax.config``)."""

from peftjax.config import PacaConfig
from peftjax.tuners.paca._layer import ColumnIndices, PacaLayer, PacaSpec
from peftjax.tuners.paca._model import inject_paca, layer_seed, select_columns

__all__ = ["ColumnIndices", "PacaConfig", "PacaLayer", "PacaSpec", "inject_paca", "layer_seed", "select_columns"]
