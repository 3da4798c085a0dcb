"""``PeanutConfig``: HF PEFT 0.22.0's PEANuT config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_int, check_number, to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeanutConfig(PeftConfig):
    """PEANuT: a weight update computed from the frozen weight by a small trained network,
    ``delta_W^T = s * B(g(W^T A^T))``.

    ``A [r, out]`` reads each input row of the weight (``W^T``, ``[in, out]``), ``depth`` encoder
    layers and as many decoder layers (``[r, r]`` each, with skip connections from encoder to
    decoder, U-Net style) transform it under the activation, ``B [out, r]`` maps it back. The update
    depends on ``W``, so merging caches the pre-merge weight, as PEFT does.

    Attributes:
        r: The network's width.
        depth: Encoder (and decoder) layers between ``A`` and ``B``.
        act_fn: The activation, a name of transformers' ``ACT2FN`` (``"relu"``); those with
            weights (``"prelu"``, ``"xielu"``) are refused when the adapter is made.
        scaling: ``s``.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (LoRA's table). GPT-2's ``Conv1D`` is refused, as PEFT
            refuses it.
        exclude_modules: Modules never targeted, same syntax.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        init_weights: ``True``: ``B`` starts at zero (the identity); ``False``: drawn too (torch's
            Kaiming-uniform range, as every other factor).
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "PEANUT"

    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_int("depth", self.depth, minimum=0)
        if not isinstance(self.act_fn, str):
            raise TypeError(f"`act_fn` must be a str, got {self.act_fn!r} ({type(self.act_fn).__name__}).")
        check_number("scaling", self.scaling)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_layer_selection(self)
        check_bool("init_weights", self.init_weights)
