"""``DeloraConfig``: HF PEFT 0.22.0's DeLoRA config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_probability,
    to_str_tuple,
)
from peftjax.config._lora import _pattern_dict
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeloraConfig(PeftConfig):
    """DeLoRA (decoupled low-rank adaptation): a LoRA whose update has a bounded norm.

    ``delta_W = B diag(lambda / (r |a_i| |b_i|)) A``, each input column then scaled by the frozen
    base weight's column norm (``delora_w_norm``, taken when the adapter is made): the rank-one
    terms are normalised, so ``lambda`` alone sets the update's size, decoupled from its direction.

    Attributes:
        r: The rank.
        delora_lambda: The initial (trained) bound ``lambda``.
        module_dropout: Dropout on the adapter's input while training.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT copies LoRA's table). GPT-2's ``Conv1D`` is
            refused, as PEFT refuses it.
        exclude_modules: Modules never targeted, same syntax.
        bias: ``"none"``, ``"all"`` or ``"delora_only"``.
        init_weights: ``True``: ``B`` starts at zero (the identity); ``False``: drawn too.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        rank_pattern: ``{name_or_regex: r}`` per module, PEFT's matching (as ``LoraConfig``'s).
        lambda_pattern: ``{name_or_regex: delora_lambda}`` per module.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "DELORA"

    r: int = 8
    delora_lambda: float = 15.0
    module_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    lambda_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_number("delora_lambda", self.delora_lambda)
        check_probability("module_dropout", self.module_dropout)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_choice("bias", self.bias, ["none", "all", "delora_only"])
        check_bool("init_weights", self.init_weights)
        check_layer_selection(self)
        self._set("rank_pattern", _pattern_dict("rank_pattern", self.rank_pattern, integer=True))
        self._set("lambda_pattern", _pattern_dict("lambda_pattern", self.lambda_pattern, integer=False))
