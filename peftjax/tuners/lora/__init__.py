"""LoRA (and DoRA, rsLoRA, PiSSA, OLoRA): config, NNX layers, injection, PEFT file layout, Linen.

- ``LoraConfig`` lives in ``peftjax.config`` (configs sit below every other layer); re-exported here.
- ``_layer.py``: ``LoraLinear``/``LoraEmbed`` and ``KernelLora``, the forward/DoRA/merge that
  ``LoraLinear`` and ``LoraConv`` share; LoRA's init (PiSSA, OLoRA, randomized SVD).
- ``_layer_general.py``: ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``.
- ``_model.py``: ``inject_lora`` and PEFT's ``fan_in_fan_out`` rule.
- ``_linen.py``: LoRA for Flax Linen models as pure functions on ``params`` (``peftjax.linen``).

The file layout is each layer's ``peft_layout``, read and written by the base tuner's walk.
"""

from peftjax.config import LoraConfig
from peftjax.tuners.lora._layer import SUPPORTED_LAYERS, KernelLora, LoraEmbed, LoraLayer, LoraLinear, LoraSpec
from peftjax.tuners.lora._layer_general import LoraConv, LoraEinsum, LoraLinearGeneral
from peftjax.tuners.lora._model import inject_lora, lora_layers

__all__ = [
    "SUPPORTED_LAYERS",
    "KernelLora",
    "LoraConfig",
    "LoraConv",
    "LoraEinsum",
    "LoraEmbed",
    "LoraLayer",
    "LoraLinear",
    "LoraLinearGeneral",
    "LoraSpec",
    "inject_lora",
    "lora_layers",
]
