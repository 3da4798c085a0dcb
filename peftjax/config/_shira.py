"""``ShiraConfig``: HF PEFT 0.22.0's sparse high-rank adapter config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_int, to_str_tuple


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShiraConfig(PeftConfig):
    """SHiRA: a sparse update of each targeted weight, ``r (in + out)`` entries at fixed positions.

    ``delta_W`` is zero but at the positions of a mask chosen when the adapter is made; only those
    entries (``shira_weight``) train, as many as a rank-``r`` LoRA has, and the update's rank is not
    bounded by ``r``. Files carry the positions (``shira_indices [2, n]``, row and column of the
    ``[out, in]`` weight), so an adapter moves between PEFT and peftjax with its exact mask.

    Attributes:
        r: Sets the number of trained entries, ``r (in + out)`` per layer (at most ``in * out``).
        mask_type: ``"random"``: positions drawn uniformly without replacement, exactly as PEFT's
            torch generator draws them (layers above ``2**32 / 20`` entries excepted: there torch
            draws 64-bit numbers, not reproduced, and peftjax's positions differ); other mask types
            (PEFT's user-supplied ``mask_fn``) load from files, whose positions they carry, but
            cannot make new adapters here.
        random_seed: Seeds the random mask (``None``: a fresh torch generator's seed, as in PEFT);
            either way every layer of one shape gets the same mask, as in PEFT.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT's SHiRA table: LoRA's, with Phi's ``q_proj``,
            ``v_proj``).
        fan_in_fan_out: PEFT's field; SHiRA adapts ``torch.nn.Linear`` only (GPT-2's ``Conv1D`` is
            refused, as in PEFT).
        init_weights: ``True``: the entries start at zero (a no-op); ``False``: standard normal.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "SHIRA"

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        if not isinstance(self.mask_type, str):
            raise ValueError(f"`mask_type` must be a string, got {self.mask_type!r}")
        check_int("random_seed", self.random_seed, optional=True)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("init_weights", self.init_weights)
