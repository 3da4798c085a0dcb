"""``MissConfig``: HF PEFT 0.22.0's MiSS (formerly Bone) config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_choice, check_int, check_probability, to_str_tuple
from peftjax.config._vera import check_layer_selection

MISS_INITS = (True, False, "bat", "mini")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MissConfig(PeftConfig):
    """MiSS (Matrix Shard Sharing, formerly Bone): one small block shared by every input shard of a weight.

    With the torch weight ``W [out, in]`` cut into ``in / r`` column shards of width ``r``, each
    variant trains ``miss_block`` and computes:

    - ``init_weights=True`` (balance, PEFT's default) or ``False``: ``miss_block [r, out]`` is
      added to every shard, ``W'[o, i] = W[o, i] + B[i % r, o]``; the forward sums ``x``'s shards
      (zero-padded to a multiple of ``r``) and multiplies once, ``y = base(x) + sum_k x_k B``.
      ``True`` starts ``B`` at zero; ``False`` draws it (the adapter changes the output at once).
    - ``"mini"``: ``miss_block [r, mini_r]``, repeated ``out / mini_r`` times along the output.
    - ``"bat"``: ``miss_block [out / r, r, r]``, a non-linear update of each ``r x r`` block of
      ``W``: ``W'_pq = W_pq + W_pq B_p + B_p`` (``p`` the output shard, ``q`` the input shard).

    Attributes:
        r: The shard width (``<= in``; ``"bat"`` needs ``in`` and ``out`` divisible by it).
        miss_dropout: Dropout on the input of the balance and mini variants, while training.
        mini_r: The output width of ``"mini"``'s block (``out`` must be divisible by it).
        target_modules: Which linear layers; the syntax of ``LoraConfig.target_modules``. ``None``
            means the architecture default (PEFT copies LoRA's table). GPT-2's ``Conv1D`` is
            refused, as PEFT refuses it.
        exclude_modules: Modules never targeted, same syntax.
        init_weights: The variant: ``True``, ``False``, ``"bat"`` or ``"mini"`` (above).
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        bias: ``"none"``, ``"all"`` or ``"MiSS_only"`` (the targeted layers' biases train).
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "MISS"

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        check_probability("miss_dropout", self.miss_dropout)
        check_int("mini_r", self.mini_r, minimum=1)
        if not (isinstance(self.init_weights, bool) or self.init_weights in ("bat", "mini")):
            raise ValueError(f"`init_weights` must be one of {list(MISS_INITS)}, got {self.init_weights!r}.")
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_choice("bias", self.bias, ["none", "all", "MiSS_only"])
        check_layer_selection(self)
