"""``PolyConfig``: HF PEFT 0.22.0's Polytropon (Poly) / multi-head routing config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, to_str_tuple


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolyConfig(PeftConfig):
    """Poly: each targeted linear layer holds ``n_skills`` LoRA pairs, mixed per row by its task's
    learned routing weights (``task_ids``), in ``n_splits`` heads (multi-head routing, MHR).

    ``y = base(x) + x A_t B_t / r`` with ``A_t = sum_s w_ts A_s`` (per split) and ``w_t`` the
    normalised sigmoid of the task's router logits (while training, a relaxed Bernoulli sample of
    them, under the dropout key).

    Attributes:
        r: Each skill's rank.
        target_modules: Which ``nnx.Linear`` layers; the syntax of ``LoraConfig.target_modules``.
            ``None`` means the architecture default (PEFT copies LoRA's). GPT-2's ``Conv1D`` is
            refused, as in PEFT.
        exclude_modules: Modules never targeted, same syntax.
        init_weights: ``True``: ``B`` zero, so the adapter starts as a no-op; ``False``: ``B``
            drawn as ``A`` is (torch's ``kaiming_uniform_`` range).
        poly_type: ``"poly"``, the only router PEFT has.
        n_tasks: How many tasks (``task_ids`` in ``[0, n_tasks)``).
        n_skills: LoRA pairs per layer.
        n_splits: Heads each pair is cut into along the input and output features (1: Poly; more:
            MHR); it must divide every targeted layer's sizes.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "POLY"

    r: int = 8
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_bool("init_weights", self.init_weights)
        check_choice("poly_type", self.poly_type, ["poly"])
