"""``VBLoRAConfig``: HF PEFT 0.22.0's VB-LoRA config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_number, check_probability
from peftjax.config._base import to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class VBLoRAConfig(PeftConfig):
    """VB-LoRA: every LoRA factor assembled from one trained bank of vectors the whole model shares.

    A layer's ``A [r, in]`` is ``r x in/L`` sub-vectors of length ``L`` and ``B [out, r]`` is
    ``out/L x r`` of them; each sub-vector is a softmax-weighted mix of the ``topk`` bank vectors
    its trained logits (over all ``num_vectors``) rank highest. Only the bank
    (``num_vectors x vector_length``) and the logits train; ``y = base(x) + dropout(x) A^T B^T``.

    Attributes:
        r: The rank.
        num_vectors: The bank's vectors.
        vector_length: ``L``; it divides every targeted layer's input and output sizes.
        topk: How many bank vectors each sub-vector mixes.
        target_modules: Which linear layers (GPT-2's ``Conv1D`` too); the syntax of
            ``LoraConfig.target_modules``. ``None`` means PEFT's VB-LoRA table for the model type.
        exclude_modules: Modules never targeted, same syntax.
        save_only_topk_weights: Files keep each sub-vector's top-k indices and weights instead of its
            logits (smaller; PEFT loads them for inference, and so does peftjax).
        vblora_dropout: Dropout on the adapter's input while training.
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set from each layer, as PEFT sets it.
        bias: ``"none"``, ``"all"`` or ``"vblora_only"``.
        init_vector_bank_bound: The bank starts uniform in ``[-bound, bound]``.
        init_logits_std: The logits start normal with this standard deviation.
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "VBLORA"

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "num_vectors", "vector_length", "topk"):
            check_int(name, getattr(self, name), minimum=1)
        if self.topk > self.num_vectors:
            raise ValueError(f"`topk` ({self.topk}) must not exceed `num_vectors` ({self.num_vectors})")
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_bool("save_only_topk_weights", self.save_only_topk_weights)
        check_probability("vblora_dropout", self.vblora_dropout)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_choice("bias", self.bias, ["none", "all", "vblora_only"])
        check_number("init_vector_bank_bound", self.init_vector_bank_bound)
        check_number("init_logits_std", self.init_logits_std)
        check_layer_selection(self)
