"""Putting WaveFT into an NNX model: each layer's coefficient count, PEFT's positions, the spectra.

PEFT never saves the positions: every layer draws ``torch.randperm(out * in)[:n]`` under
``torch.Generator().manual_seed(random_loc_seed)`` when the adapter is created (the same seed on
every layer, so layers of one shape share positions), and so does peftjax, without torch.
"""

from __future__ import annotations

import jax
from flax import nnx

from peftjax.config import WaveFTConfig
from peftjax.tuners.base import (
    add_saved_copy,
    find_targets,
    mark_biases,
    match_modules_to_save,
    resolve_config,
    settle_fan_in_fan_out,
    validate_adapter_name,
)
from peftjax.tuners.fourierft._model import spectral_positions
from peftjax.tuners.waveft._layer import WaveFTLayer, WaveFTSpec, waveft_class_for


def n_frequencies(config: WaveFTConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Each target's coefficient count (``shapes``: name -> ``(in, out)``), as PEFT allots them:
    with ``proportional_parameters``, ``n_frequency * len(shapes)`` shared in proportion to
    ``in * out`` (at least 1, Python's rounding); else ``n_frequency_pattern``, then ``n_frequency``."""
    if not config.proportional_parameters:
        return {name: config.n_frequency_for(name) for name in shapes}
    total = sum(n_in * n_out for n_in, n_out in shapes.values())
    budget = config.n_frequency * len(shapes)
    return {name: max(1, round((n_in * n_out) / total * budget)) for name, (n_in, n_out) in shapes.items()}


def inject_waveft(
    model: nnx.Module, config: WaveFTConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> WaveFTConfig:
    """Adds WaveFT adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; the targeted layers must be ``nnx.Linear`` (GPT-2's ``Conv1D``
        included).
      config: the WaveFT settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name under which the spectrum is stored.
      key: the init key of the spectrum (only ``init_weights=False`` draws one).

    Returns:
      The resolved config.

    Raises:
      ValueError: nothing matches ``target_modules``; a layer's ``n_frequency`` exceeds
        ``in * out`` (PEFT's check), or the layer is too large for the reproduced permutation.
      TypeError: a target is not a linear layer, or carries another method's adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_waveft(model, peftjax.WaveFTConfig(n_frequency=16, wavelet_family="db2"))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.waveft_spectrum["default"].shape  # doctest: +SKIP
    (16,)
    """
    validate_adapter_name(adapter_name)
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules, targets = find_targets(model, config, WaveFTLayer, "WaveFT")
    config = settle_fan_in_fan_out(config, [modules[n] for n in targets])
    shapes = {name: tuple(modules[name].kernel.get_value().shape) for name in targets}
    counts = n_frequencies(config, shapes)
    indices = spectral_positions(modules, targets, counts, config.random_loc_seed, WaveFTLayer, adapter_name)
    for i, name in enumerate(targets):
        module = modules[name]
        module.__class__ = waveft_class_for(module)
        module._adapter_setup(name)
        spec = WaveFTSpec(n_frequency=counts[name], scaling=float(config.scaling),
                          wavelet_family=config.wavelet_family, use_idwt=config.use_idwt)
        module.add_waveft(adapter_name, spec, indices[name], jax.random.fold_in(key, i),
                          init_weights=config.init_weights)
    mark_biases(modules, targets, config.bias)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
