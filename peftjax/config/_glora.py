"""``GloraConfig``: HF PEFT 0.22.0's GLoRA (generalised LoRA) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, to_str_tuple

GLORA_A_B = ("constant", "lora", "none", "vector")
GLORA_C = ("lora", "none", "vector")
GLORA_D_E = ("constant", "none", "vector")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GloraConfig(PeftConfig):
    """GLoRA: the frozen weight and bias scaled and shifted by trained terms,
    ``W' = W + W * A + B`` and ``b' = b + b * D + E + W C``.

    Each term is parameterised on its own: ``"lora"`` a rank-``r`` product (``A``, ``B``: ``[out, in]``;
    ``C``: ``[in, 1]``), ``"vector"`` one value per output (per input for ``C``), ``"constant"`` one
    scalar, ``"none"`` zero. ``C``, ``D`` and ``E`` act on the bias, so they exist only on layers that
    have one (as in PEFT).

    Attributes:
        r: The rank of the ``"lora"`` terms.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT copies LoRA's table). GPT-2's ``Conv1D`` is refused,
            as PEFT refuses it.
        bias: ``"none"``, ``"all"`` or ``"glora_only"``.
        config_A_B: ``"lora"``, ``"vector"``, ``"constant"`` or ``"none"``.
        config_C: ``"lora"``, ``"vector"`` or ``"none"``.
        config_D_E: ``"vector"``, ``"constant"`` or ``"none"``.
        init_weights: ``True``: every term starts at zero (the identity); ``False``: drawn (torch's
            Kaiming-uniform range; a constant from ``N(0, 0.02)``).
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "GLORA"

    r: int = 8
    target_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_choice("bias", self.bias, ["none", "all", "glora_only"])
        check_choice("config_A_B", self.config_A_B, GLORA_A_B)
        check_choice("config_C", self.config_C, GLORA_C)
        check_choice("config_D_E", self.config_D_E, GLORA_D_E)
        check_bool("init_weights", self.init_weights)
