"""``FrodConfig``: HF PEFT 0.22.0's FRoD config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_choice, check_int, check_number, check_probability
from peftjax.config._base import to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrodConfig(PeftConfig):
    """FRoD: each targeted weight rewritten in a basis its layer shares with the same projection in
    every other layer, and trained there: a diagonal and a few off-diagonal entries.

    For each kind of projection (``self_attn_q_proj``, ``mlp_down_proj``, ...: the last two parts of
    the module's name, PEFT's "category") one frozen ``V [in, in]`` is built from the weights of
    every targeted layer of that kind (a QR of them stacked, then an eigendecomposition; an SVD where
    they have fewer rows than columns). Each layer then writes its weight ``W = U diag(lambda) V^T``
    (``U``'s columns of unit norm, frozen) and computes

        y = x W'^T + b,   W' = U (S + diag(lambda)) V^T,

    where ``lambda [in]`` (starting at the column norms, so the adapter starts as the base) and the
    values of the sparse ``S [in, in]`` (zero at first, at ``sparse_rate`` of the off-diagonal
    positions, the same positions for every layer of the kind) train.

    Attributes:
        target_modules: Which linear layers (GPT-2's ``Conv1D`` too); the syntax of
            ``LoraConfig.target_modules``. ``None`` means the architecture default (PEFT's VeRA
            table).
        projection_prng_key: The seed of the sparse positions.
        save_projection: The file carries each kind's ``V`` and positions (``base_model.frod_V.<kind>``,
            ``frod_s_indices``, ``frod_s_size``). Only ``True`` is implemented: without them PEFT
            rebuilds ``V`` by torch's QR and eigendecomposition (whose eigenvector signs differ
            between LAPACK builds) and the positions by torch's ``randperm``, so such a file would
            not mean the same here.
        frod_dropout: Dropout on the layer input while training (then the layer adds
            ``(W' - W) dropout(x)`` to the base output, as PEFT does).
        fan_in_fan_out: Whether targets store their weight ``(in, out)``; set as PEFT sets it.
        bias: ``"none"``, ``"all"`` or ``"frod_only"`` (the targeted layers' biases train).
        init_weights: ``True``: ``S`` zero (the adapter starts as the base); ``False``: ``S``
            ``N(0, 0.1^2)`` and ``lambda`` moved by ``N(0, 0.1^2)`` (for tests).
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        sparse_rate: The fraction of a kind's off-diagonal positions that train (at least one
            where it is positive).
        regularization_alpha: The ridge term of the joint decomposition.
        progressbar: PEFT's progress bar while building the bases; kept for the file (peftjax
            shows none).
        runtime_offload_base_weight: PEFT's option to keep base weights in host memory while
            unused; kept for the file, no effect here.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "FROD"

    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_int("projection_prng_key", self.projection_prng_key, minimum=0)
        check_bool("save_projection", self.save_projection)
        check_probability("frod_dropout", self.frod_dropout)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_choice("bias", self.bias, ["none", "all", "frod_only"])
        check_bool("init_weights", self.init_weights)
        check_layer_selection(self)
        check_number("sparse_rate", self.sparse_rate)
        if not 0 <= self.sparse_rate <= 1:
            raise ValueError(f"`sparse_rate` should be between 0 and 1, got {self.sparse_rate}.")
        check_number("regularization_alpha", self.regularization_alpha)
        check_bool("progressbar", self.progressbar)
        check_bool("runtime_offload_base_weight", self.runtime_offload_base_weight)
        if not self.save_projection:
            raise NotImplementedError(
                "FrodConfig(save_projection=False) is not implemented: without the saved bases PEFT rebuilds them "
                "from the base weights by torch's QR and eigendecomposition (whose eigenvector signs differ between "
                "LAPACK builds) and the sparse positions by torch's randperm, so such a file would not mean the same "
                "here; save the adapter with save_projection=True (PEFT's default)")
