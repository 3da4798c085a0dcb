"""``AdaLoraConfig``: HF PEFT 0.22.0's AdaLoRA config, field for field (LoRA's fields and its own)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

from peftjax.config._base import check_int, check_number, check_optional_dict
from peftjax.config._lora import LoraConfig

# LoRA fields AdaLoRA inherits but whose non-default values peftjax's AdaLoRA does not implement
# (PEFT's AdaLoRA ignores most of them silently; here they are named instead).
_ADALORA_UNSUPPORTED: dict[str, Any] = {
    "use_rslora": False,
    "alpha_pattern": {},
    "lora_bias": False,
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
}


def _check_rank_pattern(value: Any) -> dict[str, list[bool]] | None:
    """AdaLoRA's ``rank_pattern``: ``{"<module path>.lora_E": [kept?, ...]}``, PEFT's saved masks."""
    d = check_optional_dict("rank_pattern", value)
    if d is None:
        return None
    out = {}
    for key, mask in d.items():
        if not isinstance(key, str) or not isinstance(mask, list | tuple) or \
                not all(isinstance(b, bool) for b in mask):
            raise TypeError(
                f"`rank_pattern` maps '<module>.lora_E' to a list of bools (the kept singular values), "
                f"got {key!r}: {mask!r}."
            )
        out[key] = list(mask)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(LoraConfig):
    """AdaLoRA: LoRA in SVD form, ``ΔW = B (E ⊙ A) · lora_alpha / ranknum``, whose rank budget shrinks.

    Every targeted layer starts at rank ``init_r``; after ``tinit`` warm-up steps the total budget
    falls cubically to ``target_r`` per layer at step ``total_step - tfinal``, every ``deltaT``
    steps zeroing the singular values ``E`` with the lowest importance (``peftjax.tuners.adalora``'s
    rank allocator). The fields inherited from :class:`LoraConfig` mean what they mean there; ``r``
    is unused (PEFT warns, as here).

    Attributes:
        target_r: The target average rank per layer.
        init_r: The initial rank of every layer.
        tinit: Warm-up steps before the budget starts to fall.
        tfinal: Final fine-tuning steps at the final budget.
        deltaT: Steps between two budget allocations.
        beta1: EMA coefficient of the sensitivity (importance) smoothing, in (0, 1).
        beta2: EMA coefficient of the uncertainty, in (0, 1).
        orth_reg_weight: The weight of the orthogonal regularisation of ``A`` and ``B`` in the loss.
        total_step: The total number of training steps (required, > 0).
        rank_pattern: The allocator's masks, ``{"<module>.lora_E": [bool] * init_r}``: set at the
            end of budgeting and written to ``adapter_config.json``; the file then holds only the
            kept rows, as PEFT saves it. ``None`` before any allocation.
    """

    peft_type: ClassVar[str] = "ADALORA"

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815  (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None

    def __post_init__(self) -> None:
        rank_pattern = self.rank_pattern
        self._set("rank_pattern", {})  # LoRA's rank_pattern (ints) is a different thing
        super().__post_init__()
        self._set("rank_pattern", _check_rank_pattern(rank_pattern))
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA.")
        if self.loftq_config or self.init_lora_weights == "loftq":
            raise ValueError("ADALORA does not support LOFTQ.")
        if not isinstance(self.init_lora_weights, bool):
            raise NotImplementedError(
                f"AdaLoraConfig.init_lora_weights={self.init_lora_weights!r} is not supported: AdaLoRA inits "
                "E = 0 and A, B ~ N(0, 0.02) (True) or leaves them random (False)."
            )
        for name, default in _ADALORA_UNSUPPORTED.items():
            if getattr(self, name) != default:
                raise NotImplementedError(
                    f"AdaLoraConfig.{name}={getattr(self, name)!r} is not supported by peftjax's AdaLoRA (PEFT's "
                    f"AdaLoRA ignores it); leave it at {default!r}."
                )
        for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT"):
            check_int(name, getattr(self, name), minimum=0 if name in ("tinit", "tfinal") else 1)
        for name in ("beta1", "beta2", "orth_reg_weight"):
            check_number(name, getattr(self, name))
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be in (0, 1), got {getattr(self, name)}.")
        if self.r != 8:
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. If you intended to set the "
                          "initial rank, use `init_r` instead.", stacklevel=3)
        check_int("total_step", self.total_step, optional=True)
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if self.orth_reg_weight < 0:
            raise ValueError(f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is "
                             f"{self.orth_reg_weight}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError("The supplied schedule values don't allow for a budgeting phase. Decrease "
                             "`tfinal`/`tinit` or increase `total_step`.")
