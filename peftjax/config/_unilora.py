"""``UniLoraConfig``: HF PEFT 0.22.0's Uni-LoRA config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_number, to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniLoraConfig(PeftConfig):
    """Uni-LoRA: every LoRA factor entry of every targeted layer read from one trained vector.

    All the ``A [r, in]`` and ``B [out, r]`` entries of the targeted layers, in the model's module
    order, are assigned positions of ``theta_d`` (``theta_d_length`` values) by a seeded balanced
    shuffle, each position used ``floor`` or ``ceil(D / theta_d_length)`` times, and scaled by
    ``1 / sqrt(uses)``. Only ``theta_d`` trains.

    Attributes:
        r: The factors' rank.
        proj_seed: The assignment's seed (NumPy's ``default_rng``, PEFT's own draw).
        theta_d_length: The trained vector's length.
        target_modules: Which linear layers (GPT-2's ``Conv1D`` too); the syntax of
            ``LoraConfig.target_modules``. ``None`` means the architecture default (LoRA's table).
        unilora_dropout: Dropout on the adapter's input while training.
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set from each layer, as
            PEFT sets it.
        bias: ``"none"``, ``"all"`` or ``"unilora_only"``.
        init_theta_d_bound: ``theta_d`` starts uniform in ``+-init_theta_d_bound``.
        init_weights: ``True``: that uniform start; ``False``: ``N(0, 1)``.
        save_indices: Save the positions and scales with the adapter (else they are assigned again
            from ``proj_seed`` when it loads, as PEFT does).
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "UNILORA"

    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    target_modules: tuple[str, ...] | str | None = None
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r)
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer, got {self.r}.")
        check_int("proj_seed", self.proj_seed)
        check_int("theta_d_length", self.theta_d_length)
        if self.theta_d_length <= 0:
            raise ValueError(f"`theta_d_length` should be a positive integer, got {self.theta_d_length}.")
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_number("unilora_dropout", self.unilora_dropout)
        if not 0.0 <= self.unilora_dropout < 1.0:
            raise ValueError(f"`unilora_dropout` should be in [0.0, 1.0), got {self.unilora_dropout}.")
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_choice("bias", self.bias, ["none", "all", "unilora_only"])
        check_number("init_theta_d_bound", self.init_theta_d_bound)
        if self.init_theta_d_bound <= 0:
            raise ValueError(f"`init_theta_d_bound` should be a positive float, got {self.init_theta_d_bound}.")
        check_bool("init_weights", self.init_weights)
        check_bool("save_indices", self.save_indices)
        check_layer_selection(self)
