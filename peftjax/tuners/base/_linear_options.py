"""The options every linear-layer method shares with LoRA: PEFT's ``fan_in_fan_out`` rule and ``bias``.

LoRA, VeRA, FourierFT (and IA³'s ``fan_in_fan_out``) follow the same PEFT rules: the saved
``fan_in_fan_out`` says whether the targets store their weight ``(in, out)`` like transformers'
``Conv1D``, and ``bias="all"`` / ``"<method>_only"`` train the base biases.
"""

from __future__ import annotations

import dataclasses
import warnings

from flax import nnx

from peftjax.config import PeftConfig
from peftjax.tuners.base._model import stores_in_out
from peftjax.tuners.base._variables import TrainableParam


# PEFT's warnings, word for word (peft/tuners/lora/layer.py, dispatch_default)
FAN_IN_FAN_OUT_LINEAR_WARNING = (
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
)
FAN_IN_FAN_OUT_CONV1D_WARNING = (
    "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."
)


def settle_fan_in_fan_out(config: PeftConfig, targets: list[nnx.Module]) -> PeftConfig:
    """``fan_in_fan_out`` as PEFT's ``dispatch_default`` leaves it, with PEFT's warnings.

    PEFT visits the targets in order and flips the config on a mismatch: ``True`` on a
    ``torch.nn.Linear`` (the twin of an ``nnx.Linear``, ``LinearGeneral`` or ``Einsum``, whose
    adapters are written in its layout) becomes ``False``; ``False`` on transformers' ``Conv1D``
    (whose weight is stored ``(in, out)``) becomes ``True``. Embeddings and convolutions leave
    it as it is, and so do quantized linears (PEFT's bitsandbytes dispatchers come first and do
    not check; transformers made even GPT-2's ``Conv1D`` an ``[out, in]`` bitsandbytes linear).
    The value is only what the saved ``adapter_config.json`` says: peftjax's own layouts do not
    depend on it.
    """
    from peftjax.quantization import QuantizedLinear

    fan_in_fan_out = config.fan_in_fan_out
    for module in targets:
        if isinstance(module, QuantizedLinear):
            continue  # PEFT's bitsandbytes dispatchers take such a layer before dispatch_default: no check
        if stores_in_out(module):
            if not fan_in_fan_out:
                warnings.warn(FAN_IN_FAN_OUT_CONV1D_WARNING, stacklevel=3)
                fan_in_fan_out = True
        elif isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)) and fan_in_fan_out:
            warnings.warn(FAN_IN_FAN_OUT_LINEAR_WARNING, stacklevel=3)
            fan_in_fan_out = False
    if fan_in_fan_out == config.fan_in_fan_out:
        return config
    return dataclasses.replace(config, fan_in_fan_out=fan_in_fan_out)


def mark_biases(modules: dict[str, nnx.Module], targets: list[str], mode: str) -> None:
    """``bias="all"`` (every bias) / ``"<method>_only"`` (the targets' biases): those base biases train."""
    if mode == "none":
        return
    chosen = targets if mode.endswith("_only") else [n for n in modules if n]
    for name in chosen:
        bias = getattr(modules[name], "bias", None)
        if isinstance(bias, nnx.Param) and not isinstance(bias, TrainableParam):
            modules[name].bias = TrainableParam(bias.get_value())
