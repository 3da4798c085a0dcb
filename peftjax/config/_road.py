"""``RoadConfig``: HF PEFT 0.22.0's RoAd (2D rotary adaptation) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, to_str_tuple

ROAD_VARIANTS = ("road_1", "road_2", "road_4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoadConfig(PeftConfig):
    """RoAd: each pair of a layer's outputs rotated and scaled, ``y' = R y``.

    The outputs are cut into groups of ``group_size``; in a group, element ``i`` pairs with
    element ``i + group_size / 2``, and each pair ``(y1, y2)`` becomes
    ``(a cos t * y1 - b sin t * y2, b sin t * y1 + a cos t * y2)`` with trained angles
    ``road_theta`` and scales ``road_alpha``. ``R`` is block-sparse, so the forward is two
    element-wise products; merging folds it into the weight and the bias (``R W``, ``R b``).

    Attributes:
        variant: How many angles and scales a pair gets: ``"road_1"`` one per pair across the
            group's two halves (``out / 2`` each), ``"road_2"`` one per element (``out``),
            ``"road_4"`` separate ones for the cosine and the sine (``2 * out``).
        group_size: The group width (even; every targeted layer's output must divide by it).
        init_weights: ``True``: angles 0 and scales 1 (the identity); ``False``: angles
            ``N(0, 0.5)`` and scales ``N(1, 0.5)`` (the adapter changes the output at once).
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT copies LoRA's table). GPT-2's ``Conv1D`` is
            refused, as PEFT refuses it.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "ROAD"

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("variant", self.variant, ROAD_VARIANTS)
        check_int("group_size", self.group_size, minimum=2)
        if self.group_size % 2:
            raise ValueError(f"The group_size must be divisible by 2 when using RoadLayer, but got {self.group_size}.")
        check_bool("init_weights", self.init_weights)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
