"""``BeftConfig``: HF PEFT 0.22.0's BEFT (bias-efficient fine-tuning) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, to_str_tuple


@dataclasses.dataclass(frozen=True, kw_only=True)
class BeftConfig(PeftConfig):
    """BEFT: a trained bias added to each targeted layer's output, the base bias frozen.

    ``y = base(x) + b'`` with ``beft_bias [1, out]``; the paper trains the value projections'
    biases only (PEFT's default targets). Merging adds ``b'`` to the layer's bias, so a layer
    without one (Llama's projections) trains and saves but does not merge, as in PEFT.

    Attributes:
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT's BEFT table: the value projection).
        init_weights: ``True``: the bias starts at zero (the identity); ``False``: drawn from
            ``N(0, 1)``.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "BEFT"

    target_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_bool("init_weights", self.init_weights)
