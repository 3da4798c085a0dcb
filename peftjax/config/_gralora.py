"""``GraloraConfig``: HF PEFT 0.22.0's granular low-rank adaptation config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_number, check_probability
from peftjax.config._base import to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraloraConfig(PeftConfig):
    """GraLoRA: a LoRA cut into ``k x k`` blocks, each block of the weight with its own rank-``r/k`` pair.

    The input is split into ``k`` slices of ``in / k`` features and the output into ``k`` of
    ``out / k``; slice ``i``'s ``A_i [in/k, r]`` feeds ``r/k`` ranks to each output slice ``j``,
    whose ``B_j [r, out/k]`` reads the ``r/k`` ranks every input slice sent it. The parameters are a
    rank-``r`` LoRA's, the update's rank up to ``k r``. With ``hybrid_r > 0`` a plain rank-``hybrid_r``
    LoRA is added beside it; both are scaled by ``alpha / (r + hybrid_r)``.

    Attributes:
        r: The rank (divisible by ``gralora_k``).
        hybrid_r: The plain LoRA's rank beside it (0: none).
        target_modules: Which linear layers (GPT-2's ``Conv1D`` too); the syntax of
            ``LoraConfig.target_modules``. ``None`` means the architecture default (PEFT copies LoRA's).
        alpha: The scale's numerator.
        gralora_dropout: Dropout on the adapter's input while training.
        gralora_k: The number of input and output slices ``k``; it divides ``r`` and every targeted
            layer's input and output sizes.
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set from each layer, as
            PEFT sets it (with PEFT's warning when it disagrees).
        bias: ``"none"``, ``"all"`` or ``"gralora_only"``.
        init_weights: ``True``: ``B`` starts at zero (a no-op); ``False``: drawn too.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "GRALORA"

    r: int = 32
    hybrid_r: int = 0
    target_modules: tuple[str, ...] | str | None = None
    alpha: int = 64
    gralora_dropout: float = 0.0
    gralora_k: int = 2
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_int("hybrid_r", self.hybrid_r, minimum=0)
        check_number("alpha", self.alpha)
        check_probability("gralora_dropout", self.gralora_dropout)
        check_int("gralora_k", self.gralora_k, minimum=1)
        if self.r % self.gralora_k != 0:
            raise ValueError(f"r should be divisible by gralora_k, but got {self.r} and {self.gralora_k}")
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("init_weights", self.init_weights)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_choice("bias", self.bias, ["none", "all", "gralora_only"])
        check_layer_selection(self)
