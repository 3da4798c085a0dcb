"""``FourierFTConfig``: HF PEFT 0.22.0's FourierFT config, field for field."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_optional_dict,
    to_str_tuple,
)
from peftjax.config._vera import check_layer_selection


def check_count_pattern(config: PeftConfig, name: str = "n_frequency_pattern") -> None:
    """Validates a ``{module name or regex: count}`` option (FourierFT's, WaveFT's) and stores a copy."""
    pattern = check_optional_dict(name, getattr(config, name)) or {}
    for key, value in pattern.items():
        if not isinstance(key, str):
            raise TypeError(f"`{name}` keys must be module names or regexes (str), got {key!r}.")
        check_int(f"{name}[{key!r}]", value, minimum=1)
    config._set(name, pattern)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FourierFTConfig(PeftConfig):
    """FourierFT: a weight update learned as ``n_frequency`` entries of its 2-D Fourier spectrum.

    ``delta_W = real(ifft2(S)) * scaling``, with ``S: [out, in]`` zero except at ``n_frequency``
    fixed random positions, which hold the trained ``fourierft_spectrum``. The positions are the
    first ``n_frequency`` entries of ``torch.randperm(out * in)`` under
    ``torch.Generator().manual_seed(random_loc_seed)``, as in PEFT, which does not save them;
    peftjax reproduces that permutation bit for bit with NumPy's MT19937 (no torch needed).

    Attributes:
        n_frequency: The number of trained spectral entries per layer (``<= in * out``).
        scaling: The factor on ``delta_W`` (like LoRA's ``alpha / r``).
        random_loc_seed: The seed of the spectral positions.
        fan_in_fan_out: Whether the base weight is stored ``[in, out]`` (GPT-2 ``Conv1D``); set
            as PEFT sets it, with its warning.
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``.
            ``None`` means the architecture default (GPT-2: ``mlp.c_proj``).
        exclude_modules: Modules never targeted, same syntax.
        bias: ``"none"``, ``"all"`` or ``"fourier_only"`` (the targeted layers' biases train).
        modules_to_save: See :class:`PeftConfig`.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        n_frequency_pattern: ``{name_or_regex: n_frequency}`` per module; a key applies to a
            module whose name matches ``.*\\.<key>$`` (PEFT's rule), the first such key wins.
        init_weights: ``False`` (PEFT's default): the spectrum starts standard normal, so the
            adapter changes the output from the start; ``True``: zeros (a no-op adapter).
    """

    peft_type: ClassVar[str] = "FOURIERFT"

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    n_frequency_pattern: dict = dataclasses.field(default_factory=dict)
    init_weights: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_frequency", self.n_frequency, minimum=1)
        check_number("scaling", self.scaling)
        check_int("random_loc_seed", self.random_loc_seed, minimum=0)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_choice("bias", self.bias, ["none", "all", "fourier_only"])
        check_layer_selection(self)
        check_count_pattern(self)
        check_bool("init_weights", self.init_weights)

    def n_frequency_for(self, module_name: str) -> int:
        """The module's ``n_frequency``: the first ``n_frequency_pattern`` key matching ``.*\\.<key>$``."""
        for key, value in self.n_frequency_pattern.items():
            if re.match(rf".*\.{key}$", module_name):
                return value
        return self.n_frequency
