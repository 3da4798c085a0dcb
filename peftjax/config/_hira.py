"""``HiraConfig``: HF PEFT 0.22.0's Hadamard high-rank adaptation config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_probability, to_str_tuple
from peftjax.config._lora import _pattern_dict
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class HiraConfig(PeftConfig):
    """HiRA: the frozen weight times a low-rank matrix, element by element: ``delta_W = W ⊙ (B A)``.

    A rank-``r`` pair (``hira_A [r, in]``, ``hira_B [out, r]``, a LoRA's parameters) modulates every
    entry of the weight, so the update's rank is not bounded by ``r``. On an embedding the pair is
    ``hira_embedding_A [r, num]`` and ``hira_embedding_B [dim, r]``, applied to the table.

    Attributes:
        r: The rank of the modulating pair.
        target_modules: Which linear (GPT-2's ``Conv1D`` too) or embedding layers; the syntax of
            ``LoraConfig.target_modules``. ``None`` means the architecture default (PEFT copies LoRA's).
        exclude_modules: Modules never targeted, same syntax.
        hira_dropout: Dropout on the adapter's input while training (linear layers).
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set from each layer, as PEFT
            sets it.
        init_weights: ``True``: ``A`` in torch's ``kaiming_uniform_`` range, ``B`` zero (on an
            embedding ``A`` zero, ``B`` standard normal), so the adapter starts as a no-op;
            ``"gaussian"``: ``A ~ N(0, 1/r^2)`` instead; ``False``: both standard normal.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        rank_pattern: ``{name_or_regex: r}`` per module, PEFT's matching.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "HIRA"

    r: int = 32
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_weights: bool | str = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_probability("hira_dropout", self.hira_dropout)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_choice("init_weights", self.init_weights, [True, False, "gaussian"])
        check_layer_selection(self)
        self._set("rank_pattern", _pattern_dict("rank_pattern", self.rank_pattern, integer=True))
