"""``VeraConfig``: HF PEFT 0.22.0's VeRA config, field for field."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_probability,
    to_str_tuple,
)
from peftjax.config._lora import _layer_indices


def check_layer_selection(config: PeftConfig) -> None:
    """Validates ``layers_to_transform`` / ``layers_pattern`` as PEFT does (shared by VeRA and FourierFT)."""
    config._set("layers_to_transform", _layer_indices(config.layers_to_transform))
    config._set("layers_pattern", to_str_tuple("layers_pattern", config.layers_pattern, sort=False))
    if isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
    if isinstance(config.target_modules, str) and config.layers_pattern is not None:
        raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")


def _check_shared_projection(config: PeftConfig, prefix: str) -> None:
    """The fields VeRA and PVeRA share (``prefix``: their dropout's and bias mode's names)."""
    check_int("r", config.r, minimum=1)
    config._set("target_modules", to_str_tuple("target_modules", config.target_modules, sort=True))
    check_int("projection_prng_key", config.projection_prng_key, minimum=0)
    check_bool("save_projection", config.save_projection)
    check_probability(f"{prefix}_dropout", getattr(config, f"{prefix}_dropout"))
    check_number("d_initial", config.d_initial)
    check_bool("fan_in_fan_out", config.fan_in_fan_out)
    check_choice("bias", config.bias, ["none", "all", f"{prefix}_only"])
    check_bool("init_weights", config.init_weights)
    check_layer_selection(config)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(PeftConfig):
    """VeRA: one pair of frozen random matrices shared by every layer, and trained scaling vectors.

    A targeted layer computes ``y = W x + lambda_b * (B (lambda_d * (A dropout(x))))``, where
    ``A: [r, in_max]`` and ``B: [out_max, r]`` are drawn once for the whole model (sized by the
    largest targeted layer and sliced to each layer's ``[:, :in]`` / ``[:out, :]``), and only
    ``lambda_d: [r]`` and ``lambda_b: [out]`` train.

    Attributes:
        r: The rank of the shared projections (PEFT's default 256; VeRA wants larger ranks than LoRA).
        target_modules: Which linear layers get VeRA; the syntax and matching of
            ``LoraConfig.target_modules``. ``None`` means the architecture default.
        projection_prng_key: The seed of the projections. They are drawn exactly as PEFT draws
            them (Kaiming-uniform from ``torch.Generator().manual_seed(projection_prng_key)``;
            reproduced bit for bit with NumPy's MT19937, no torch needed).
        save_projection: Whether the adapter file carries the projections
            (``base_model.vera_A`` / ``base_model.vera_B``). With ``False`` they are regenerated
            from ``projection_prng_key`` on load, by PEFT and by peftjax alike.
        vera_dropout: Dropout on the layer input of the VeRA branch, in training only.
        d_initial: The initial value of every ``lambda_d`` entry (``lambda_b`` starts at zero).
        fan_in_fan_out: Whether the base weight is stored ``[in, out]`` (GPT-2 ``Conv1D``); set
            as PEFT sets it, with its warning.
        bias: ``"none"``, ``"all"`` (every bias in the model trains and is saved) or
            ``"vera_only"`` (the targeted layers' biases).
        modules_to_save: See :class:`PeftConfig`.
        init_weights: ``True``: ``lambda_d = d_initial``, ``lambda_b = 0`` (a no-op adapter).
            ``False``: ``lambda_b = 1`` and ``lambda_d`` standard normal (for tests).
        layers_to_transform: Only adapt layers with these indices (see ``LoraConfig``).
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
    """

    peft_type: ClassVar[str] = "VERA"

    r: int = 256
    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_shared_projection(self, "vera")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PveraConfig(PeftConfig):
    """PVeRA: VeRA whose middle is a sampled Gaussian (probabilistic VeRA).

    ``A: [2r, in_max]`` and ``B: [out_max, r]`` are shared and frozen as VeRA's; with the trained
    ``lambda_d: [2r]`` and ``lambda_b: [out]``, ``[mu, logvar] = lambda_d * (A dropout(x))`` and
    ``y = W x + lambda_b * (B z)``, ``z = mu + eps exp(logvar / 2)`` while training (the noise from
    the dropout key), ``z = mu`` otherwise. Merging folds the mean.

    Attributes:
        r: The rank (``A`` has ``2r`` rows).
        target_modules, projection_prng_key, save_projection, d_initial, fan_in_fan_out,
        init_weights, layers_to_transform, layers_pattern, modules_to_save: as :class:`VeraConfig`'s
            (PEFT's PVeRA table of default targets: LoRA's, ``phi`` and ``dinov2`` aside).
        pvera_dropout: Dropout on the layer input of the PVeRA branch, in training only.
        bias: ``"none"``, ``"all"`` or ``"pvera_only"``.
        sample_at_inference: Sample at inference too (then the model must run inside
            ``peftjax.dropout_key(key)``, which gives the noise).
        generator_seed: PEFT's seed of its torch sampling generator; carried in the file, unused
            here (the noise comes from JAX keys).
    """

    peft_type: ClassVar[str] = "PVERA"

    r: int = 256
    target_modules: tuple[str, ...] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    sample_at_inference: bool = False
    generator_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_shared_projection(self, "pvera")
        check_bool("sample_at_inference", self.sample_at_inference)
        check_int("generator_seed", self.generator_seed, optional=True)
        if not self.save_projection:
            warnings.warn(
                "Specified to not save pvera_A and pvera_B within the state dictionary, instead they will be restored "
                "using the PRNG key store in `config.projection_prng_key`. Consider setting `config.save_projection` "
                "to `True` to guarantee restoring the checkpoint correctly on all system configurations.",
                stacklevel=3,
            )
