"""``OSFConfig``: HF PEFT 0.22.0's OSF (orthogonal subspace fine-tuning) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, to_str_tuple


def _check_rank(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be an int, a float in (0, 1] or None, got {value!r}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OSFConfig(PeftConfig):
    """OSF: each targeted weight split by its SVD into a frozen top subspace and a trained rest.

    ``W = U_high S_high V_high + U_low S_low V_low``: the ``effective_rank`` largest singular
    directions stay frozen; ``U_low``, ``S_low`` and ``V_low`` (the other ``min(out, in) -
    effective_rank``) train, their gradients projected orthogonal to the frozen ``U_high`` and
    ``V_high``, so the update never moves the preserved subspace. The adapter adds
    ``U_low S_low V_low - (its SVD start)``.

    Attributes:
        effective_rank: The frozen rank: an int, a float in ``(0, 1]`` (that share of
            ``min(out, in)``) or ``None`` (half of it).
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means every linear layer but the output head (PEFT's ``all-linear``).
        rank_pattern: ``{regex: effective_rank}`` per module, the first ``re.search`` match (PEFT's rule).
        init_weights: ``True``: the trained factors start at the SVD's (the identity); ``False``:
            drawn ``N(0, 1)``.
        target_svd_config: Carried in the file; unused (as in PEFT).
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "OSF"

    effective_rank: int | float | None = None
    target_modules: tuple[str, ...] | str | None = None
    rank_pattern: dict | None = None
    init_weights: bool = True
    target_svd_config: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rank("effective_rank", self.effective_rank)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise TypeError(f"`rank_pattern` must be a dict of regex -> rank, got {self.rank_pattern!r}.")
            for pattern, value in self.rank_pattern.items():
                _check_rank(f"rank_pattern[{pattern!r}]", value)
        check_bool("init_weights", self.init_weights)
        if self.target_svd_config is not None and not isinstance(self.target_svd_config, dict):
            raise TypeError(f"`target_svd_config` must be a dict or None, got {self.target_svd_config!r}.")
