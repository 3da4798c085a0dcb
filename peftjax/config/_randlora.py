"""``RandLoraConfig``: HF PEFT 0.22.0's RandLoRA config, field for field."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_number, check_probability
from peftjax.config._base import to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandLoraConfig(PeftConfig):
    """RandLoRA: a full-rank update from frozen random bases shared by every layer, scaled per layer.

    The model holds two frozen random bases, ``randlora_A [r, 1, min]`` and ``randlora_B
    [max, n, r]`` (``min``/``max`` the smaller/larger of the largest targeted input and output
    sizes, ``n = ceil(min / r)``). A layer with ``n_l = ceil(min(in, out) / r)`` bases trains
    ``randlora_lambda [r, n_l]`` and ``randlora_gamma [n_l, min(in, out)]``; its update is
    ``B_flat (lambda ⊙ A ⊙ gamma)_flat * randlora_alpha / r``, of rank up to ``min(in, out)``.

    Attributes:
        r: The rank of each basis (smaller ``r``: more bases, more trained parameters).
        target_modules: Which linear layers (GPT-2's ``Conv1D`` too); the syntax of
            ``LoraConfig.target_modules``. ``None`` means the architecture default (PEFT copies LoRA's).
        projection_prng_key: Seeds the bases, drawn as PEFT draws them (torch's generator, the
            dense bases in bfloat16: PEFT's choice where accelerate reports bf16 support, as on
            this CPU and recent GPUs; elsewhere PEFT draws them in float16, which peftjax does not).
        save_projection: Whether files carry the bases (PEFT's default; the safe choice, since
            regenerating them depends on that dtype).
        sparse: Ternary bases (``-1, 0, 1``, a third nonzero), scaled to unit variance.
        very_sparse: Ternary bases with ``1 / sqrt(min)`` of them nonzero.
        randlora_dropout: Dropout on the adapter's input while training.
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set from each layer, as PEFT sets it.
        randlora_alpha: The scale's numerator (PEFT's default 640: twenty times its default ``r``).
        bias: ``"none"``, ``"all"`` or ``"randlora_only"``.
        init_weights: ``True``: ``lambda`` zero (a no-op), ``gamma`` ``1 / max(its shape)``;
            ``False``: ``lambda`` standard normal, ``gamma`` ``1 / max(in, out)``.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "RANDLORA"

    r: int = 32
    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    randlora_alpha: int = 640
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_int("projection_prng_key", self.projection_prng_key)
        for name in ("save_projection", "sparse", "very_sparse", "fan_in_fan_out", "init_weights"):
            check_bool(name, getattr(self, name))
        check_probability("randlora_dropout", self.randlora_dropout)
        check_number("randlora_alpha", self.randlora_alpha)
        check_choice("bias", self.bias, ["none", "all", "randlora_only"])
        check_layer_selection(self)
        if not self.save_projection:
            warnings.warn(
                "Specified to not save basis_A and basis_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
