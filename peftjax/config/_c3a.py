"""``C3AConfig``: HF PEFT 0.22.0's circular-convolution adaptation config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_choice, check_int, to_str_tuple
from peftjax.config._lora import _pattern_dict
from peftjax.config._vera import check_layer_selection

C3A_INITS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclasses.dataclass(frozen=True, kw_only=True)
class C3AConfig(PeftConfig):
    """C3A: a layer's update is a block-circulant matrix, applied as circular convolutions.

    ``delta_W`` (``[out, in]``) is cut into ``b x b`` blocks, each circulant and given by one
    trained row of ``c3a_kernel [out / b, in / b, b]``; the update is divided by ``in``. A token
    costs ``O((in + out) log b + in out / b)``, and ``b = 1`` is a dense update.

    Attributes:
        block_size: ``b``; it must divide every targeted layer's input and output sizes.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT's C3A table: LoRA's, with GPT-2's ``mlp.c_proj``,
            a ``Conv1D`` that PEFT's C3A then refuses). GPT-2's ``Conv1D`` is refused, as in PEFT.
        bias: ``"none"``, ``"all"`` or ``"c3a_only"`` (the targeted layers' biases train).
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        block_size_pattern: ``{name_or_regex: block_size}`` per module, PEFT's matching.
        init_weights: ``True``: zeros (the adapter starts as a no-op); ``"xavier_uniform"`` (PEFT's
            default, and ``False``), ``"kaiming_uniform"`` or ``"gaussian"``: drawn, so the model
            changes from the start.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "C3A"

    block_size: int = 256
    target_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    block_size_pattern: dict = dataclasses.field(default_factory=dict)
    init_weights: bool | str = "xavier_uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("block_size", self.block_size, minimum=1)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_choice("bias", self.bias, ["none", "all", "c3a_only"])
        check_choice("init_weights", self.init_weights, list(C3A_INITS))
        check_layer_selection(self)
        self._set("block_size_pattern", _pattern_dict("block_size_pattern", self.block_size_pattern, integer=True))
