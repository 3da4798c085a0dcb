"""``TinyLoraConfig``: HF PEFT 0.22.0's TinyLoRA config, field for field."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_number, check_probability
from peftjax.config._base import to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyLoraConfig(PeftConfig):
    """TinyLoRA: a LoRA-XS whose ``r x r`` middle is a tiny trained vector through fixed random tensors.

    Each targeted weight's truncated SVD gives frozen ``A = sqrt(S) V^T [r, in]`` and
    ``B = U sqrt(S) [out, r]``; the layer adds ``x A^T R^T B^T`` with ``R = sum_i v_i P_i``, the
    ``P [u, r, r]`` fixed ``N(0, 1/r)`` tensors drawn from ``projection_seed`` plus the layer's
    index, and ``v [u]`` trained, shared by groups of layers (``weight_tying``: 0, one ``v`` per
    layer; 1, one for the model).

    Attributes:
        r: The SVD rank (capped at each layer's smaller size).
        u: The length of each trained vector.
        weight_tying: The share of layers tied to one vector, in ``[0, 1]``.
        projection_seed: The seed of the ``P`` tensors (torch's generator, reproduced).
        save_projection: Save ``P`` with the adapter (else drawn again when it loads).
        init_v_bound: ``init_weights="uniform"`` draws ``v`` in ``+-init_v_bound``.
        target_modules: Which linear layers (GPT-2's ``Conv1D`` too); the syntax of
            ``LoraConfig.target_modules``. ``None`` means the architecture default (LoRA's table).
        tinylora_dropout: Dropout on the adapter's input while training.
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set from each layer, as
            PEFT sets it.
        bias: ``"none"``, ``"all"`` or ``"tinylora_only"``.
        init_weights: ``True``: ``v`` starts at zero (the identity); ``"uniform"``: drawn as above;
            ``False``: ``N(0, 1)`` (PEFT leaves the memory uninitialised).
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "TINYLORA"

    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init_v_bound: float = 0.02
    target_modules: tuple[str, ...] | str | None = None
    tinylora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool | str = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r)
        if self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        check_int("u", self.u)
        if self.u <= 0:
            raise ValueError(f"`u` should be a positive integer value but the value passed is {self.u}")
        check_number("weight_tying", self.weight_tying)
        if not 0.0 <= self.weight_tying <= 1.0:
            raise ValueError(f"`weight_tying` should be a float between 0.0 and 1.0 but the value passed is "
                             f"{self.weight_tying}")
        check_int("projection_seed", self.projection_seed)
        check_bool("save_projection", self.save_projection)
        check_number("init_v_bound", self.init_v_bound)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_probability("tinylora_dropout", self.tinylora_dropout)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_choice("bias", self.bias, ["none", "all", "tinylora_only"])
        check_choice("init_weights", self.init_weights, [True, False, "uniform"])
        check_layer_selection(self)
        if not self.save_projection:
            warnings.warn(
                "Specified to not save projection tensors P within the state dictionary. They will be restored "
                "using the PRNG key stored in `config.projection_seed`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
