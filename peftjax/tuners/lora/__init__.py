"""LoRA (and DoRA, rsLoRA, PiSSA, OLoRA): config, NNX layers, injection, PEFT file layout, Linen.

- ``LoraConfig`` lives in ``peftjax.config`` (configs sit below every other layer); re-exported here.
- ``_math.py``: LoRA as pure functions of arrays (``LoraSpec``; init with PiSSA, OLoRA and the
  randomized SVD; DoRA; merge; PEFT's torch layouts), shared by the NNX layers and Linen.
- ``_layer.py``: ``LoraLayer``, the init/forward/DoRA/merge/file layout every NNX layer kind
  shares, and ``LoraLinear``/``LoraEmbed``.
- ``_layer_general.py``: ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``.
- ``_combine.py``: ``add_weighted_adapter``'s merge rules (task arithmetic, TIES, DARE, magnitude
  pruning; PEFT's ``merge_utils``) and per-layer combination.
- ``_convert.py``: PiSSA/OLoRA saved as a plain LoRA, and any additive method's adapter as a LoRA
  (``convert_to_lora``, truncated SVD).
- ``_model.py``: ``inject_lora`` and PEFT's ``fan_in_fan_out`` rule.
- ``_replication.py``: PEFT's ``layer_replication`` (the base's layers stacked, copies sharing weights).
- ``_capture.py``: the inputs of chosen layers during a jitted forward (EVA's and CorDA's data).
- ``_eva.py``: EVA (``get_eva_state_dict``, ``initialize_lora_eva_weights``).
- ``_corda.py``: CorDA (``preprocess_corda``, then ``init_lora_weights="corda"`` at injection).
- ``_astra.py``: Astra (``preprocess_astra``, then ``init_lora_weights="astra"`` at injection).
- ``_arrow.py``: Arrow's router on the layers (prototypes, GenKnowSub; ``peftjax.arrow`` builds the model).
- ``_loraga.py``: LoRA-GA (``preprocess_loraga``, then ``init_lora_weights="lora_ga"`` at injection).
- ``_linen.py``: LoRA for Flax Linen models as pure functions on ``params`` (``peftjax.linen``).

The file layout is each layer's ``peft_layout``, read and written by the base tuner's walk.
"""

from peftjax.config import LoraConfig
from peftjax.tuners.lora._convert import convert_to_lora, save_as_lora
from peftjax.tuners.lora._combine import dare_linear, dare_ties, magnitude_prune, prune, task_arithmetic, ties
from peftjax.tuners.lora._layer import SUPPORTED_LAYERS, LoraEmbed, LoraLayer, LoraLinear
from peftjax.tuners.lora._math import LoraSpec, svd_lowrank
from peftjax.tuners.lora._layer_general import LoraConv, LoraEinsum, LoraLinearGeneral
from peftjax.tuners.lora._model import inject_lora, kasa_loss, lora_layers
from peftjax.tuners.lora._replication import replicate_layers
from peftjax.tuners.lora._astra import AstraEigens, preprocess_astra
from peftjax.tuners.lora._corda import CordaEigens, preprocess_corda
from peftjax.tuners.lora._loraga import preprocess_loraga
from peftjax.tuners.lora._eva import get_eva_state_dict, initialize_lora_eva_weights

__all__ = [
    "SUPPORTED_LAYERS",
    "AstraEigens",
    "CordaEigens",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "preprocess_astra",
    "preprocess_corda",
    "preprocess_loraga",
    "convert_to_lora",
    "save_as_lora",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "prune",
    "task_arithmetic",
    "ties",
    "LoraConfig",
    "LoraConv",
    "LoraEinsum",
    "LoraEmbed",
    "LoraLayer",
    "LoraLinear",
    "LoraLinearGeneral",
    "LoraSpec",
    "inject_lora",
    "kasa_loss",
    "lora_layers",
    "replicate_layers",
    "svd_lowrank",
]
