"""``HRAConfig``: HF PEFT 0.22.0's Householder reflection adaptation config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class HRAConfig(PeftConfig):
    """HRA: a layer's weight times a chain of ``r`` Householder reflections, ``W' = W H``.

    ``H = (I - 2 u_0 u_0^T) ... (I - 2 u_{r-1} u_{r-1}^T)`` over the input features, with the
    trained ``hra_u: [in, r]`` normalised column by column; with ``apply_GS`` its columns are made
    orthonormal first (Gram-Schmidt) and ``H = I - 2 U U^T``. ``H`` is orthogonal, so HRA is an
    orthogonal fine-tuning whose parameters grow with ``r * in``, as LoRA's do.

    Attributes:
        r: The number of reflections. Even for the default initialisation, which repeats each
            drawn column twice so that the reflections cancel and the adapter starts as the
            identity; with an odd ``r`` PEFT (and peftjax) warns and draws every column, so the
            adapter changes the output from the start.
        apply_GS: Gram-Schmidt orthogonalisation of the reflections.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT copies LoRA's table), ``"all-linear"`` every
            linear layer but the output head. GPT-2's ``Conv1D`` is refused, as PEFT refuses it.
        exclude_modules: Modules never targeted, same syntax.
        init_weights: ``True``: the identity start above; ``False``: every column drawn.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        bias: ``"none"``, ``"all"`` or ``"hra_only"`` (the targeted layers' biases train).
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "HRA"

    r: int = 8
    apply_GS: bool = False  # noqa: N815 - PEFT's field name
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_bool("apply_GS", self.apply_GS)
        check_bool("init_weights", self.init_weights)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_choice("bias", self.bias, ["none", "all", "hra_only"])
        check_layer_selection(self)
