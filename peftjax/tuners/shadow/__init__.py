"""ShadowPEFT: a trainable shadow network beside a frozen decoder (``ShadowConfig`` from ``peftjax.config``)."""

from peftjax.config import ShadowConfig
from peftjax.tuners.shadow._model import (
    ShadowBlock,
    ShadowModel,
    inject_shadow,
    load_shadow_state_dict,
    shadow_state_dict,
)

__all__ = ["ShadowBlock", "ShadowConfig", "ShadowModel", "inject_shadow", "load_shadow_state_dict",
           "shadow_state_dict"]
