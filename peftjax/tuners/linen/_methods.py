"""The weight-delta methods as :mod:`peftjax.linen` sees them: per-layer settings, init and ``ΔW``.

A Linen layer's kernel is a ``[n_in, n_out]`` matrix once flattened (its torch twin is an
``nn.Linear``). For each method, the static settings of one adapter on one such layer (a frozen,
hashable dataclass, so a ``jit`` static) know:

- ``keys``: the params keys its trained weights live under (PEFT's attribute names, which are also
  the file suffixes: ``hada_w1_a``, ``lokr_w2``, ``vera_lambda_b``, ``fourierft_spectrum``,
  ``lora_A``/``lora_E``/``lora_B``), each in PEFT's own layout, so the file map is the identity;
- ``init(key, n_in, n_out)``: PEFT's initial weights (the NNX layer's own init function);
- ``delta(weights, n_in, n_out)``: ``ΔW`` in torch's ``[out, in]`` layout, float32, scaled, by the
  method's pure function that the NNX layer uses too (``hadamard_delta``, ``lokr_delta``,
  ``vera_delta``, ``fourier_delta``, ``adalora_delta``);
- the training-time dropouts PEFT applies: ``input_dropout`` (VeRA's ``vera_dropout``, AdaLoRA's
  ``lora_dropout``, on the branch input), ``rank_dropout`` / ``module_dropout`` (LoHa, LoKr: rows of
  ``ΔW``, the whole adapter).

The constants VeRA's projections and FourierFT's spectral positions are drawn from their seeds
exactly as PEFT draws them (NumPy, host side), at trace time; they are not params.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.config import (
    AdaLoraConfig,
    FourierFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    PeftConfig,
    VeraConfig,
    is_feedforward_module,
)
from peftjax.tuners.adalora._layer import _init_factors, adalora_delta
from peftjax.tuners.fourierft._layer import fourier_delta
from peftjax.tuners.fourierft._model import fourier_indices
from peftjax.tuners.loha._layer import hadamard_delta, loha_init
from peftjax.tuners.lokr._layer import lokr_delta, lokr_init
from peftjax.tuners.vera._layer import vera_delta
from peftjax.tuners.vera._model import vera_projections

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
VERA_KEYS = ("vera_lambda_b", "vera_lambda_d")
FOURIER_KEYS = ("fourierft_spectrum",)
ADALORA_KEYS = ("lora_A", "lora_E", "lora_B")
IA3_KEYS = ("ia3_l",)
DELTA_KEYS = tuple(dict.fromkeys(LOHA_KEYS + LOKR_KEYS + VERA_KEYS + FOURIER_KEYS + ADALORA_KEYS + IA3_KEYS))
"""Every params key a weight-delta (or IA³) adapter's trained weights live under."""


@dataclasses.dataclass(frozen=True)
class _Dropouts:
    input_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = True
    scales = False  # IA³ rescales instead of adding a ΔW


@dataclasses.dataclass(frozen=True)
class LoHaSettings(_Dropouts):
    """LoHa on one layer: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r``."""

    r: int = 8
    alpha: float = 8
    init_weights: bool = True
    keys = LOHA_KEYS

    def init(self, key, n_in: int, n_out: int) -> dict:
        return loha_init(key, n_in, n_out, self.r, self.init_weights)

    def delta(self, w: Mapping, n_in: int, n_out: int) -> jax.Array:
        return hadamard_delta(w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"], self.alpha / self.r)


@dataclasses.dataclass(frozen=True)
class LoKrSettings(_Dropouts):
    """LoKr on one layer: ``ΔW = kron(w1, w2) · alpha / r``, each factor whole or a rank-r product."""

    r: int = 8
    alpha: float = 8
    init_weights: bool | str = True
    decompose_both: bool = False
    decompose_factor: int = -1
    keys = LOKR_KEYS

    def init(self, key, n_in: int, n_out: int) -> dict:
        return lokr_init(key, n_in, n_out, self.r, self)  # reads the config's field names off self

    def delta(self, w: Mapping, n_in: int, n_out: int) -> jax.Array:
        return lokr_delta(w, self.alpha / self.r)


@dataclasses.dataclass(frozen=True)
class VeraSettings(_Dropouts):
    """VeRA on one layer: ``ΔW = (lambda_b · B[:out]) @ (lambda_d · A[:, :in])``, ``A``/``B`` shared."""

    r: int = 256
    projection_prng_key: int = 0
    in_max: int = 0
    out_max: int = 0
    save_projection: bool = True
    init_weights: bool = True
    d_initial: float = 0.1
    keys = VERA_KEYS

    def projections(self) -> tuple[np.ndarray, np.ndarray]:
        return _projections(self.r, self.in_max, self.out_max, self.projection_prng_key)

    def init(self, key, n_in: int, n_out: int) -> dict:
        if self.init_weights:  # PEFT's reset_vera_parameters
            return {"vera_lambda_b": jnp.zeros((n_out,), jnp.float32),
                    "vera_lambda_d": jnp.full((self.r,), self.d_initial, jnp.float32)}
        return {"vera_lambda_b": jnp.ones((n_out,), jnp.float32),
                "vera_lambda_d": jax.random.normal(key, (self.r,), jnp.float32)}

    def delta(self, w: Mapping, n_in: int, n_out: int) -> jax.Array:
        a, b = self.projections()
        return vera_delta(w["vera_lambda_b"], w["vera_lambda_d"], a[:, :n_in], b[:n_out, :])


@dataclasses.dataclass(frozen=True)
class FourierSettings(_Dropouts):
    """FourierFT on one layer: ``ΔW = real(ifft2(S)) · scaling`` with ``n_frequency`` trained entries."""

    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    init_weights: bool = False
    keys = FOURIER_KEYS

    def init(self, key, n_in: int, n_out: int) -> dict:
        n = self.n_frequency
        spectrum = jnp.zeros((n,), jnp.float32) if self.init_weights else jax.random.normal(key, (n,), jnp.float32)
        return {"fourierft_spectrum": spectrum}

    def delta(self, w: Mapping, n_in: int, n_out: int) -> jax.Array:
        indices = _indices(n_in, n_out, self.n_frequency, self.random_loc_seed)
        return fourier_delta(w["fourierft_spectrum"], indices, n_in, n_out, self.scaling)


@dataclasses.dataclass(frozen=True)
class AdaLoraSettings(_Dropouts):
    """AdaLoRA on one layer: ``ΔW = B (A ⊙ E) · scaling / (ranknum + 1e-5)``, ``ranknum = init_r``."""

    r: int = 12
    ranknum: int = 12
    scaling: float = 1.0
    init_weights: bool = True
    keys = ADALORA_KEYS

    def init(self, key, n_in: int, n_out: int) -> dict:
        a, e, b = _init_factors(key, r=self.r, n_in=n_in, n_out=n_out, init=bool(self.init_weights))
        return {"lora_A": a, "lora_E": e, "lora_B": b}

    def delta(self, w: Mapping, n_in: int, n_out: int) -> jax.Array:
        return adalora_delta(w["lora_A"], w["lora_E"], w["lora_B"], self.scaling, float(self.ranknum))


@dataclasses.dataclass(frozen=True)
class IA3Settings(_Dropouts):
    """(IA)³ on one layer: no ``ΔW`` but a rescaling, ``y = base(x ⊙ l)`` (feedforward) or ``base(x) ⊙ l``.

    ``ia3_l`` is kept in PEFT's layout, ``[1, in]`` (feedforward) or ``[out, 1]``; merging scales the
    kernel's rows (feedforward) or its columns and the bias.
    """

    is_feedforward: bool = False
    init_weights: bool = True
    keys = IA3_KEYS
    scales = True

    def init(self, key, n_in: int, n_out: int) -> dict:
        shape = (1, n_in) if self.is_feedforward else (n_out, 1)
        value = jnp.ones(shape, jnp.float32) if self.init_weights else jax.random.normal(key, shape, jnp.float32)
        return {"ia3_l": value}

    def in_scale(self, w: Mapping) -> jax.Array | None:
        """The ``[in]`` factor on the input (feedforward), else ``None``."""
        return w["ia3_l"].reshape(-1) if self.is_feedforward else None

    def out_scale(self, w: Mapping) -> jax.Array | None:
        """The ``[out]`` factor on the output (and the bias), else ``None``."""
        return None if self.is_feedforward else w["ia3_l"].reshape(-1)


@functools.lru_cache(maxsize=16)
def _projections(r: int, in_max: int, out_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return vera_projections(r, in_max, out_max, seed)


@functools.lru_cache(maxsize=256)
def _indices(n_in: int, n_out: int, n: int, seed: int) -> np.ndarray:
    return fourier_indices(n_in, n_out, n, seed)


DeltaSettings = LoHaSettings | LoKrSettings | VeraSettings | FourierSettings | AdaLoraSettings | IA3Settings

METHODS = (LoHaConfig, LoKrConfig, VeraConfig, FourierFTConfig, AdaLoraConfig, IA3Config)
"""The config classes :mod:`peftjax.linen` adapts here: weight deltas, and IA³'s rescaling (LoRA has its own path)."""


def is_delta_config(config: Any) -> bool:
    return isinstance(config, METHODS)


def check_config(config: PeftConfig) -> None:
    """Refuses, by name, what the Linen path of these methods does not implement.

    Raises:
      NotImplementedError: ``modules_to_save``, a ``bias`` other than ``"none"``, ``fan_in_fan_out``,
        or ``layers_to_transform`` (Linen names have no numbered layer segment).
    """
    name = type(config).__name__
    problems = []
    if config.modules_to_save:
        problems.append(f"modules_to_save={list(config.modules_to_save)}")
    if getattr(config, "bias", "none") != "none":
        problems.append(f"bias={config.bias!r}")
    if getattr(config, "fan_in_fan_out", False):
        problems.append("fan_in_fan_out=True (Linen kernels are [in, out]; their torch twins are nn.Linear)")
    if getattr(config, "layers_to_transform", None) is not None:
        problems.append(f"layers_to_transform={config.layers_to_transform!r} (name the modules in target_modules)")
    if problems:
        raise NotImplementedError(f"peftjax.linen does not support {name} with {'; '.join(problems)}; "
                                  "the NNX path (peftjax.get_peft_model) does")


def settings_for(config: PeftConfig, name: str, shape: tuple[int, int], shapes: Sequence[tuple[int, int]],
                 where: str) -> DeltaSettings:
    """One adapter's settings on the layer called ``name`` (``shape`` ``(n_in, n_out)``).

    Args:
      config: a LoHa/LoKr/VeRA/FourierFT/AdaLoRA config.
      name: the module name its patterns (``rank_pattern``, ``n_frequency_pattern``) match.
      shape: the layer's flattened ``(n_in, n_out)``.
      shapes: every targeted layer's (VeRA sizes its shared projections by the largest).
      where: the module name for messages.

    Raises:
      ValueError: FourierFT's ``n_frequency`` exceeds ``in * out`` (PEFT's check); AdaLoRA's
        ``rank_pattern`` mask has the wrong length.
    """
    n_in, n_out = shape
    if isinstance(config, (LoHaConfig, LoKrConfig)):
        r, alpha = config.rank_and_alpha(name)
        common = dict(r=r, alpha=alpha, rank_dropout=float(config.rank_dropout),
                      module_dropout=float(config.module_dropout), init_weights=config.init_weights)
        if isinstance(config, LoHaConfig):
            return LoHaSettings(**common, rank_dropout_scale=True)
        return LoKrSettings(**common, rank_dropout_scale=config.rank_dropout_scale,
                            decompose_both=config.decompose_both, decompose_factor=config.decompose_factor)
    if isinstance(config, VeraConfig):
        return VeraSettings(r=config.r, projection_prng_key=config.projection_prng_key,
                            in_max=max(s[0] for s in shapes), out_max=max(s[1] for s in shapes),
                            save_projection=config.save_projection, init_weights=config.init_weights,
                            d_initial=float(config.d_initial), input_dropout=float(config.vera_dropout))
    if isinstance(config, FourierFTConfig):
        n = config.n_frequency_for(name)
        if n > n_in * n_out:
            raise ValueError(
                f"{where}: `n_frequency` should be less than or equal to the product of the input and output "
                f"dimensions but the value passed is {n} and the product is {n_in * n_out}"
            )
        return FourierSettings(n_frequency=n, scaling=float(config.scaling), random_loc_seed=config.random_loc_seed,
                               init_weights=config.init_weights)
    if isinstance(config, AdaLoraConfig):
        mask = (config.rank_pattern or {}).get(f"{name}.lora_E")
        if mask is not None and len(mask) != config.init_r:
            raise ValueError(f"{where}: rank_pattern['{name}.lora_E'] has {len(mask)} entries; expected "
                             f"init_r={config.init_r}")
        r = config.init_r if mask is None else int(sum(mask))
        scaling = float(config.lora_alpha) if config.lora_alpha > 0 else float(r)
        return AdaLoraSettings(r=r, ranknum=config.init_r, scaling=scaling, init_weights=bool(config.init_lora_weights),
                               input_dropout=float(config.lora_dropout))
    if isinstance(config, IA3Config):
        if config.feedforward_modules is None:
            raise ValueError(f"{where}: IA3Config.feedforward_modules is None (PEFT's default for a transformers "
                             "architecture, which a Linen model is not); pass the feedforward modules, or [] for none")
        return IA3Settings(is_feedforward=is_feedforward_module(config, name), init_weights=config.init_ia3_weights)
    raise TypeError(f"{type(config).__name__} is not a weight-delta method peftjax.linen adapts")
