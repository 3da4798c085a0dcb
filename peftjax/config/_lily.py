"""``LilyConfig``: HF PEFT 0.22.0's LiLy (low-rank interconnected adaptation across layers) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_int, check_number, to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class LilyConfig(PeftConfig):
    """LiLy: low-rank adapters whose projections are shared across layers and mixed by a router.

    Each targeted layer has its own router ``[num_B, r]``; its ``A [r, in]`` is shared by blocks of
    ``stride_A`` consecutive layers, and ``num_B`` up-projections ``B`` by every layer of the same
    target name and shape. A layer adds ``scaling * h @ sum_e p_e B_e`` with ``h = x A^T`` and ``p``
    the router's softmax averaged over every position of the batch (PEFT's rule, so a row's output
    depends on the batch it is in).

    Attributes:
        r: The rank.
        stride_A: How many consecutive layers share an ``A``.
        num_B: How many ``B`` the router mixes (at least 2).
        scaling: The update's factor.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (LoRA's table). GPT-2's ``Conv1D`` is refused, as PEFT
            refuses it.
        exclude_modules: Modules never targeted, same syntax.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        init_weights: ``True``: ``B`` starts at zero (the identity); ``False``: drawn too.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "LILY"

    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_int("stride_A", self.stride_A)
        if self.stride_A < 1:
            raise ValueError("`stride_A` must be at least 1.")
        check_int("num_B", self.num_B)
        if self.num_B < 2:
            raise ValueError("`num_B` must be at least 2 for the router to be trained.")
        check_number("scaling", self.scaling)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_layer_selection(self)
        check_bool("init_weights", self.init_weights)
