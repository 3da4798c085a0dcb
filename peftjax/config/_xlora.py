"""``XLoraConfig``: HF PEFT 0.22.0's X-LoRA config, field for field."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_int,
    check_number,
    check_optional_dict,
    check_probability,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class XLoraConfig(PeftConfig):
    """X-LoRA: a mixture of LoRA experts, weighed per token and layer by a small classifier.

    The trained LoRA adapters in ``adapters`` are loaded and frozen; each forward first runs the
    model with every adapter weighed ``scaling_pass_value`` (the base model, with the default 0),
    feeds its last hidden states to the classifier, whose output ``[batch, seq, layers, adapters]``
    (softmaxed at ``softmax_temperature`` with ``enable_softmax``) weighs each adapter's input in
    each LoRA layer of the second, real pass. Only the classifier trains (and the adapters with
    ``use_trainable_adapters``).

    Attributes:
        hidden_size: The base model's hidden size (``None``: read from the model).
        adapters: ``{"0": path, "1": path, ...}``: the LoRA adapters' directories, named by their
            positions, as PEFT requires.
        enable_softmax: Softmax the classifier's output over the adapters.
        enable_softmax_topk: Softmax the weights kept by ``top_k_lora`` among themselves.
        layerwise_scalings: One set of weights per LoRA layer (else one for all layers).
        xlora_depth: The classifier's linear layers (ReLU between them).
        xlora_size: Their hidden size (with ``xlora_depth > 1``).
        xlora_dropout_p: Dropout after each hidden layer while training.
        use_trainable_adapters: Train the LoRA adapters too.
        softmax_temperature: The softmax's temperature.
        top_k_lora: Keep each token's ``k`` largest weights per layer (``None``: all).
        scaling_pass_value: Every weight in the first pass.
        global_scaling_weight: A factor on every adapter's output.
    """

    peft_type: ClassVar[str] = "XLORA"

    hidden_size: int | None = None
    adapters: dict | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("hidden_size", self.hidden_size, minimum=1, optional=True)
        adapters = check_optional_dict("adapters", self.adapters) or {}
        expected = [str(i) for i in range(len(adapters))]
        if list(adapters) != expected:
            raise ValueError(f"`adapters` must name the LoRA adapters by their positions, {expected} in that order "
                             f"(PEFT activates them by these names); got {list(adapters)}")
        for name, path in adapters.items():
            if not isinstance(path, str):
                raise TypeError(f"`adapters[{name!r}]` must be a path (str), got {path!r}")
        self._set("adapters", adapters)
        for name in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters"):
            check_bool(name, getattr(self, name))
        check_int("xlora_depth", self.xlora_depth, minimum=1)
        check_int("xlora_size", self.xlora_size, minimum=1)
        check_probability("xlora_dropout_p", self.xlora_dropout_p)
        for name in ("softmax_temperature", "scaling_pass_value", "global_scaling_weight"):
            check_number(name, getattr(self, name))
        check_int("top_k_lora", self.top_k_lora, minimum=1, optional=True)
        if self.modules_to_save is not None:
            raise ValueError("X-LoRA has no `modules_to_save` (PEFT's XLoraConfig has no such field)")

    def to_dict(self) -> dict[str, Any]:
        """The fields PEFT 0.22.0 writes for the method (``modules_to_save`` is not one of them)."""
        out = super().to_dict()
        del out["modules_to_save"]
        return out
