"""``DeftConfig``: HF PEFT 0.22.0's DEFT (decompositional efficient fine-tuning) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_number
from peftjax.config._base import check_probability, to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeftConfig(PeftConfig):
    """DEFT: a rank-``r`` subspace of the frozen weight's output replaced by a trained one,
    ``W' = (I - P_proj) W + Q_P (s R)``.

    ``P [out, r]`` gives the projector: ``"relu"`` takes ``Q_P = P`` and ``P_proj = P relu(P)^T``
    (not orthogonal), ``"qr"`` the orthonormal ``Q_P`` of ``P``'s QR decomposition and
    ``P_proj = Q_P Q_P^T``. ``R [r, in]`` is the injected content, scaled by ``s = alpha / r``
    (``1`` without ``alpha``). The forward never forms ``W'``: it removes ``((x W^T) right) Q_P^T``
    from the base output and adds ``(x (s R)^T) Q_P^T``. PaRa (``para=True``) removes only.

    Attributes:
        r: The rank (capped at each layer's output size, as PEFT caps it).
        target_modules: Which linear layers (GPT-2's ``Conv1D`` too); the syntax of
            ``LoraConfig.target_modules``. ``None`` means the architecture default (LoRA's table).
        exclude_modules: Modules never targeted, same syntax.
        decomposition_method: ``"relu"`` or ``"qr"``.
        init_scale: With ``init_weights=False``, ``R`` is drawn from ``N(0, 0.02 init_scale)``.
        alpha: The injection's scale numerator (``None``: no scaling).
        para: PaRa: no ``R``, only the subspace removal (never the identity at the start).
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set from each layer, as
            PEFT sets it (with PEFT's warning when it disagrees).
        deft_dropout: Dropout on the injection's input while training.
        init_weights: ``True``: ``R = right^T W / s``, so the update starts at exactly zero;
            ``False``: ``R`` drawn (the subspace replaced from the start).
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        bias: ``"none"``, ``"all"`` or ``"deft_only"``.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "DEFT"

    r: int = 8
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    decomposition_method: str = "relu"
    init_scale: float = 1.0
    alpha: int | float | None = None
    para: bool = False
    fan_in_fan_out: bool = False
    deft_dropout: float = 0.0
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        if self.decomposition_method not in ("qr", "relu"):
            raise ValueError(f"Unknown decomposition_method '{self.decomposition_method}', must be one of "
                             "['qr', 'relu'].")
        check_number("init_scale", self.init_scale)
        if self.alpha is not None:
            check_number("alpha", self.alpha)
        check_bool("para", self.para)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_probability("deft_dropout", self.deft_dropout)
        check_bool("init_weights", self.init_weights)
        check_layer_selection(self)
        check_choice("bias", self.bias, ["none", "all", "deft_only"])
