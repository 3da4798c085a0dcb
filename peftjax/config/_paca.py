"""``PacaConfig``: HF PEFT 0.22.0's partial connection adaptation config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_int, check_number, check_optional_dict, to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class PacaConfig(PeftConfig):
    """PaCA: ``r`` input columns of each targeted weight trained, no extra factors.

    A layer computes ``y = x W^T + s x[:, idx] delta^T + b`` with ``idx`` the ``r`` selected input
    columns (sorted) and ``delta [out, r]`` the trained update of those columns (``paca_delta``),
    ``s = paca_alpha / r``: as many trained parameters as a rank-``r`` LoRA's ``B``. Files carry
    the columns (``paca_indices``), so an adapter moves between PEFT and peftjax with its selection.

    Attributes:
        r: The number of columns per layer (at most the layer's inputs).
        paca_alpha: The scaling numerator: ``s = paca_alpha / r``, with this ``r`` in every layer.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT copies LoRA's table).
        exclude_modules: Modules never targeted, same syntax.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        random_seed: Seeds each layer's selection with ``random_seed + crc32(layer name)`` as
            PEFT does, so the columns are PEFT's (``torch.randperm``'s first ``r``); ``None``: a
            selection drawn from the injection's key (PEFT draws from torch's global generator).
        paca_indices_pattern: ``{name_or_regex: [column, ...]}``: the columns of the matching layers
            instead of a random selection (unique, non-negative, below the layer's inputs); its
            length may differ from ``r``, the scaling stays ``paca_alpha / r``. Written in its order:
            the first key matching a layer wins.
        init_weights: ``True``: ``delta`` starts at zero (a no-op); ``False``: ``N(0, 0.1^2)``.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "PACA"

    r: int = 8
    paca_alpha: int | float = 8
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    random_seed: int | None = None
    paca_indices_pattern: dict = dataclasses.field(default_factory=dict)
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_number("paca_alpha", self.paca_alpha)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_layer_selection(self)
        check_int("random_seed", self.random_seed, optional=True)
        check_bool("init_weights", self.init_weights)
        pattern = check_optional_dict("paca_indices_pattern", self.paca_indices_pattern) or {}
        for key, indices in pattern.items():  # PEFT's checks; the upper bound is the layer's, checked there
            if not isinstance(indices, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in indices):
                raise ValueError(f"The indices in `paca_indices_pattern` must be a list of int (e.g. "
                                 f"`tensor.tolist()`), got {key!r}: {indices!r}")
            if not indices:
                raise ValueError(f"`paca_indices_pattern` must not contain an empty list of indices, got {key!r}: []")
            if len(set(indices)) != len(indices):
                raise ValueError(f"The indices in `paca_indices_pattern` must be unique, got {key!r}: {list(indices)}")
            if min(indices) < 0:
                raise ValueError(f"The indices in `paca_indices_pattern` must not be negative, got {key!r}: "
                                 f"{list(indices)}")
        self._set("paca_indices_pattern", {k: list(v) for k, v in pattern.items()})
