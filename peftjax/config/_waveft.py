"""``WaveFTConfig``: HF PEFT 0.22.0's WaveFT config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_choice,
    check_int,
    check_number,
    to_str_tuple,
)
from peftjax.config._targeting import get_pattern_key
from peftjax.config._fourierft import check_count_pattern
from peftjax.config._vera import check_layer_selection

# the wavelets PEFT 0.22.0 reconstructs correctly: its filter table holds them as PyWavelets does
WAVELETS = tuple([f"db{i}" for i in range(1, 11)] + [f"sym{i}" for i in range(2, 11)]
                 + [f"coif{i}" for i in range(1, 4)])
# names PEFT's config accepts but whose reconstruction is wrong or fails there
_BROKEN_IN_PEFT = {"coif4": "its filter table for coif4 is not PyWavelets' (not orthonormal)",
                   "coif5": "its filter table for coif5 has 48 taps instead of 30 (the update has no rows)"}
_UNKNOWN_IN_PEFT = tuple([f"db{i}" for i in range(11, 39)] + [f"sym{i}" for i in range(11, 21)]
                         + [f"coif{i}" for i in range(6, 18)])


@dataclasses.dataclass(frozen=True, kw_only=True)
class WaveFTConfig(PeftConfig):
    """WaveFT: a weight update trained as ``n_frequency`` coefficients of its 2-D wavelet transform.

    ``delta_W = scaling * idwt2(C)`` cropped to ``[out, in]``, with ``C`` zero except at
    ``n_frequency`` fixed random positions holding the trained ``waveft_spectrum``; the positions
    are the first ``n_frequency`` entries of ``torch.randperm(out * in)`` under
    ``torch.Generator().manual_seed(random_loc_seed)``, as in PEFT, which does not save them
    (peftjax draws the same permutation without torch). With ``use_idwt=False`` the coefficients
    are the update itself, a sparse ``delta_W``.

    Attributes:
        n_frequency: Trained coefficients per layer (``<= in * out``).
        scaling: The factor on ``delta_W``.
        wavelet_family: The wavelet: ``db1``-``db10``, ``sym2``-``sym10``, ``coif1``-``coif3``.
            PEFT's other names (``coif4``, ``coif5``, ``db11``-``db38``, ...) are refused by name:
            PEFT's reconstruction of them is wrong or fails.
        use_idwt: Whether ``delta_W`` is the inverse wavelet transform of the coefficients.
        random_loc_seed: The seed of the positions (the same for every layer, as in PEFT).
        fan_in_fan_out: Whether the base weight is stored ``[in, out]`` (GPT-2 ``Conv1D``); set
            as PEFT sets it, with its warning.
        target_modules: Which linear layers (``LoraConfig``'s syntax); ``None``: PEFT's default
            for the architecture (Llama: ``q_proj``, ``v_proj``; GPT-2: ``mlp.c_proj``).
        exclude_modules: Modules never targeted, same syntax.
        bias: ``"none"``, ``"all"`` or ``"waveft_only"`` (the targeted layers' biases train).
        modules_to_save: See :class:`PeftConfig`.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        n_frequency_pattern: ``{name_or_regex: n_frequency}`` per module (``get_pattern_key``).
        proportional_parameters: Share ``n_frequency * (number of targets)`` among the targets
            in proportion to their ``in * out`` (at least 1 each, rounded as Python rounds).
        init_weights: ``True``: the coefficients start at zero (a no-op adapter); ``False``:
            normal with standard deviation 0.01.
    """

    peft_type: ClassVar[str] = "WAVEFT"

    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    n_frequency_pattern: dict = dataclasses.field(default_factory=dict)
    proportional_parameters: bool = False
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_frequency", self.n_frequency, minimum=1)
        check_number("scaling", self.scaling)
        if self.wavelet_family in _BROKEN_IN_PEFT or self.wavelet_family in _UNKNOWN_IN_PEFT:
            why = _BROKEN_IN_PEFT.get(self.wavelet_family, "it has no filters for it and fails at the first forward")
            raise ValueError(f"`wavelet_family` {self.wavelet_family!r} is not supported: PEFT 0.22.0 accepts the "
                             f"name but {why}. Use one of {list(WAVELETS)}.")
        check_choice("wavelet_family", self.wavelet_family, WAVELETS)
        check_bool("use_idwt", self.use_idwt)
        check_int("random_loc_seed", self.random_loc_seed, minimum=0)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_choice("bias", self.bias, ["none", "all", "waveft_only"])
        check_layer_selection(self)
        check_count_pattern(self)
        check_bool("proportional_parameters", self.proportional_parameters)
        check_bool("init_weights", self.init_weights)

    def n_frequency_for(self, module_name: str) -> int:
        """The module's ``n_frequency`` outside proportional mode: its ``n_frequency_pattern`` entry
        (``get_pattern_key``), else ``n_frequency``."""
        key = get_pattern_key(self.n_frequency_pattern.keys(), module_name)
        return self.n_frequency_pattern.get(key, self.n_frequency)
