"""``SupertuningConfig``: HF PEFT 0.22.0's Super-Tuning config, field for field."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_number, check_probability, to_str_tuple


@dataclasses.dataclass(frozen=True, kw_only=True)
class SupertuningConfig(PeftConfig):
    """Super-Tuning: only the frozen weight's largest-magnitude entries train (its sparse support),
    optionally with a LoRA beside them (the paper's "Supra").

    Each targeted layer keeps ``int(in * out * (1 - sparsity))`` flat positions of its ``[out, in]``
    weight, ranked by ``|W|`` (largest first, or smallest with ``select_top=False``), and trains one
    value for each; with ``r``, ``x A^T B^T * lora_alpha / r`` is added too.

    Attributes:
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT copies LoRA's table). GPT-2's ``Conv1D`` is refused,
            as PEFT refuses it.
        sparsity: The share of each weight left frozen, in ``[0, 1)``.
        select_top: Train the largest entries (``True``) or the smallest.
        r: The Supra LoRA's rank (``None``: none).
        lora_alpha: Its scale's numerator; ``None`` with ``r`` set means ``2 r`` (PEFT fills it in).
        lora_dropout: Dropout on the LoRA's input while training.
        init_weights: ``True``: the values (and the LoRA's ``B``) start at zero; ``False``: drawn.
        save_precomputed_indices: Save the positions with the adapter (else they are chosen again
            from the base weight when it loads, as PEFT does; every adapter on a model the same).
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "SUPERTUNING"

    target_modules: tuple[str, ...] | str | None = None
    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    init_weights: bool = True
    save_precomputed_indices: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_number("sparsity", self.sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0.0, 1.0), got {self.sparsity}")
        check_bool("select_top", self.select_top)
        if self.r is not None:
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
                raise ValueError(f"r must be a positive integer or None, got {self.r!r}")
            if self.lora_alpha is None:
                self._set("lora_alpha", 2 * self.r)
            check_number("lora_alpha", self.lora_alpha)
        elif self.lora_alpha is not None:
            raise ValueError("lora_alpha is set but r is None — Supra mode requires an explicit r.")
        check_probability("lora_dropout", self.lora_dropout)
        check_bool("init_weights", self.init_weights)
        check_bool("save_precomputed_indices", self.save_precomputed_indices)
        if not self.save_precomputed_indices:
            warnings.warn(
                "save_precomputed_indices=False: sparse-support indices will be recomputed from base weight "
                "magnitudes at load time. This assumes the base model is identical to training time; "
                "numerical drift can cause topk tie-breaks to differ.",
                stacklevel=3,
            )
