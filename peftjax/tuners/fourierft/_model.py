"""Putting FourierFT into an NNX model: the spectral positions PEFT would draw, then the spectra.

PEFT never saves the positions: every layer draws ``torch.randperm(out * in)[:n]`` under
``torch.Generator().manual_seed(random_loc_seed)`` when the adapter is created, and so does
peftjax (``peftjax.nn._torch_rng`` reproduces the permutation bit for bit, without torch).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from peftjax.config import FourierFTConfig
from peftjax.nn._torch_rng import randperm_head
from peftjax.tuners.base import (
    add_saved_copy,
    find_targets,
    mark_biases,
    match_modules_to_save,
    resolve_config,
    settle_fan_in_fan_out,
    validate_adapter_name,
)
from peftjax.tuners.fourierft._layer import FourierFTLayer, FourierSpec, fourierft_class_for


def fourier_indices(n_in: int, n_out: int, n_frequency: int, random_loc_seed: int) -> np.ndarray:
    """PEFT's positions ``[2, n_frequency]`` (rows, columns) in a torch ``[out, in]`` weight."""
    flat = randperm_head(random_loc_seed, n_out * n_in, n_frequency)
    return np.stack([flat // n_in, flat % n_in])


def spectral_positions(modules, targets, counts: dict[str, int], seed: int, layer_type: type,
                       adapter_name: str) -> dict:
    """Each target's PEFT positions for a method that trains a few entries of a transform of the
    update (FourierFT, WaveFT), with every refusal before the first change to the model.

    Raises:
      ValueError: the adapter exists on a target; its count exceeds ``in * out`` (PEFT's message);
        the layer is too large for the reproduced permutation.
    """
    indices = {}
    for name in targets:
        if isinstance(modules[name], layer_type) and adapter_name in modules[name].adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
        n_in, n_out = modules[name].kernel.get_value().shape
        n = counts[name]
        if n > n_in * n_out:
            raise ValueError(
                f"{name}: `n_frequency` should be less than or equal to the product of the input and output "
                f"dimensions but the value passed is {n} and the product is {n_in * n_out}"
            )
        try:
            indices[name] = fourier_indices(n_in, n_out, n, seed)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return indices


def inject_fourierft(
    model: nnx.Module, config: FourierFTConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> FourierFTConfig:
    """Adds FourierFT adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; the targeted layers must be ``nnx.Linear`` (GPT-2's ``Conv1D``
        included).
      config: the FourierFT settings; ``target_modules=None`` uses PEFT's default for the model
        type; ``n_frequency_pattern`` overrides ``n_frequency`` per module.
      adapter_name: the name under which the spectrum is stored.
      key: the init key of the spectrum (``init_weights=False``, PEFT's default, draws it
        standard normal).

    Returns:
      The resolved config.

    Raises:
      ValueError: nothing matches ``target_modules``; a layer's ``n_frequency`` exceeds
        ``in * out`` (PEFT's check), or the layer is too large for the reproduced permutation.
      TypeError: a target is not a linear layer, or carries another method's adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_fourierft(model, peftjax.FourierFTConfig(n_frequency=16, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.fourierft_spectrum["default"].shape  # doctest: +SKIP
    (16,)
    """
    validate_adapter_name(adapter_name)
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules, targets = find_targets(model, config, FourierFTLayer, "FourierFT")
    config = settle_fan_in_fan_out(config, [modules[n] for n in targets])
    indices = spectral_positions(modules, targets, {n: config.n_frequency_for(n) for n in targets},
                                 config.random_loc_seed, FourierFTLayer, adapter_name)
    for i, name in enumerate(targets):
        module = modules[name]
        module.__class__ = fourierft_class_for(module)
        module._adapter_setup(name)
        spec = FourierSpec(n_frequency=config.n_frequency_for(name), scaling=float(config.scaling))
        module.add_fourierft(adapter_name, spec, indices[name], jax.random.fold_in(key, i),
                             init_weights=config.init_weights)
    mark_biases(modules, targets, config.bias)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
