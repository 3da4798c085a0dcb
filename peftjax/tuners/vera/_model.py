"""Putting VeRA into an NNX model: the shared projections, the per-layer vectors, PEFT's file layout.

The projections are drawn exactly as PEFT draws them (``peftjax.nn._torch_rng``: Kaiming-uniform
from ``torch.Generator().manual_seed(projection_prng_key)``, first ``vera_A: [r, in_max]``, then
``vera_B: [out_max, r]``, sized by the largest targeted layer), so a file saved with
``save_projection=False`` loads here and there alike, with or without torch installed.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import PveraConfig, VeraConfig
from peftjax.io._adapter import AdapterFileError, KeyMapping
from peftjax.nn._torch_rng import TorchGenerator
from peftjax.tuners.base import (
    adapter_layers,
    add_saved_copy,
    find_targets,
    layer_state_dict,
    load_layer_state_dict,
    mark_biases,
    match_modules_to_save,
    resolve_config,
    settle_fan_in_fan_out,
    validate_adapter_name,
)
from peftjax.tuners.vera._layer import (
    PveraLinear,
    VeraLayer,
    VeraLinear,
    VeraProjection,
    VeraSpec,
    pvera_class_for,
    vera_class_for,
)

# the model-level keys of the shared projections (PEFT: ``base_model.vera_A.<adapter>`` in memory)
VERA_A_KEY, VERA_B_KEY = "base_model.vera_A", "base_model.vera_B"


@dataclasses.dataclass(frozen=True)
class _Flavour:
    """What differs between VeRA and PVeRA (its probabilistic variant): names, ``A``'s rows, the layer."""

    method: str  # as the docs name it
    prng_name: str  # as PEFT's key error names it
    prefix: str  # of the keys and fields: "vera" / "pvera"
    layer: type
    class_for: Callable
    a_rows: int  # A has a_rows * r rows

    def keys(self) -> tuple[str, str]:
        return f"base_model.{self.prefix}_A", f"base_model.{self.prefix}_B"


VERA = _Flavour("VeRA", "Vera", "vera", VeraLinear, vera_class_for, 1)
PVERA = _Flavour("PVeRA", "PVeRA", "pvera", PveraLinear, pvera_class_for, 2)


def _flavour_of(layer) -> _Flavour:
    return PVERA if isinstance(layer, PveraLinear) else VERA


def vera_projections(r: int, in_max: int, out_max: int, projection_prng_key: int,
                     a_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``vera_A: [r, in_max]`` and ``vera_B: [out_max, r]`` for ``projection_prng_key``
    (PVeRA's ``pvera_A`` has ``a_rows = 2`` times ``r`` rows, drawn first from the same generator)."""
    generator = TorchGenerator(projection_prng_key)
    return generator.kaiming_uniform((a_rows * r, in_max)), generator.kaiming_uniform((out_max, r))


def inject_vera(
    model: nnx.Module, config: VeraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> VeraConfig:
    """Adds VeRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    Args:
      model: any NNX module; the targeted layers must be ``nnx.Linear`` (GPT-2's ``Conv1D``
        included).
      config: the VeRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name under which the vectors and the projections are stored.
      key: the init key for ``init_weights=False`` (``lambda_d`` standard normal).

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; or another VeRA adapter on the model has a
        different ``projection_prng_key`` or ``save_projection`` (PEFT's rule).
      TypeError: a target is not a linear layer, or carries another method's adapter.
      NotImplementedError: the model stacks its layers (``scan_layers=True``).

    >>> import peftjax  # doctest: +SKIP
    >>> config = inject_vera(model, peftjax.VeraConfig(r=8, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.vera_lambda_d["default"].shape  # doctest: +SKIP
    (8,)
    """
    return _inject(model, config, adapter_name, key, VERA)


def inject_pvera(
    model: nnx.Module, config: PveraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> PveraConfig:
    """Adds PVeRA adapter ``adapter_name`` to every layer ``config`` targets, in place: VeRA's
    shared projections (``A`` with ``2r`` rows) and vectors (``lambda_d`` ``[2r]``), the middle a
    sampled Gaussian (see :class:`PveraLinear`). Arguments, returns and errors as :func:`inject_vera`.

    >>> import peftjax  # doctest: +SKIP
    >>> config = inject_pvera(model, peftjax.PveraConfig(r=8, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.vera_lambda_d["default"].shape  # doctest: +SKIP
    (16,)
    """
    return _inject(model, config, adapter_name, key, PVERA)


def _inject(model: nnx.Module, config, adapter_name: str, key: jax.Array | None, flavour: _Flavour):
    validate_adapter_name(adapter_name)
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            f"{flavour.method} on a model built with scan_layers=True is not implemented (its projections are "
            "shared by all layers, not stacked per layer); load the model with scan_layers=False"
        )
    config = resolve_config(model, config)
    key = jax.random.key(0) if key is None else key
    for path, layer in adapter_layers(model, VeraLayer).items():
        if _flavour_of(layer) is not flavour:
            continue
        for other in layer.adapter_names():
            spec = layer.spec(other)
            if spec.projection_prng_key != config.projection_prng_key:
                raise ValueError(
                    f"{flavour.prng_name} PRNG initialisation key must be the same for all adapters. Got "
                    f"config.projection_prng_key="
                    f"{config.projection_prng_key} but adapter {other!r} has {spec.projection_prng_key}."
                )
            if spec.save_projection != config.save_projection:
                raise ValueError(
                    f"{flavour.method} projection weights must be saved for all adapters or none, but got multiple "
                    f"different values: adapter {other!r} has save_projection={spec.save_projection}, the new one "
                    f"{config.save_projection}"
                )
        break
    modules, targets = find_targets(model, config, flavour.layer, flavour.method)
    other = [n for n in targets if isinstance(modules[n], VeraLayer) and _flavour_of(modules[n]) is not flavour]
    if other:
        raise TypeError(f"{', '.join(other[:10])} already carry another method's adapter "
                        f"({_flavour_of(modules[other[0]]).method}); one method per layer is supported")
    config = settle_fan_in_fan_out(config, [modules[n] for n in targets])
    shapes = [modules[n].kernel.get_value().shape for n in targets]
    in_max, out_max = max(s[0] for s in shapes), max(s[1] for s in shapes)
    vera_a, vera_b = vera_projections(config.r, in_max, out_max, config.projection_prng_key, flavour.a_rows)
    projections = VeraProjection(jnp.asarray(vera_a)), VeraProjection(jnp.asarray(vera_b))
    spec = VeraSpec(r=config.r, dropout=float(getattr(config, f"{flavour.prefix}_dropout")),
                    projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
                    sample_at_inference=bool(getattr(config, "sample_at_inference", False)))
    for name in targets:
        if isinstance(modules[name], VeraLayer) and adapter_name in modules[name].adapter_names():
            raise ValueError(f"adapter {adapter_name!r} already exists on {name}")
    for i, name in enumerate(targets):
        module = modules[name]
        module.__class__ = flavour.class_for(module)
        module._adapter_setup(name)
        module.add_vera(adapter_name, spec, projections, jax.random.fold_in(key, i),
                        init_weights=config.init_weights, d_initial=float(config.d_initial))
    mark_biases(modules, targets, config.bias)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config


def _shared(model: nnx.Module, adapter_name: str) -> tuple[_Flavour, VeraProjection, VeraProjection]:
    layer = next(iter(adapter_layers(model, VeraLayer, adapter_name).values()))
    return _flavour_of(layer), layer.vera_A[adapter_name], layer.vera_B[adapter_name]


def vera_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: VeraConfig | PveraConfig,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """PEFT's on-disk dict: every layer's vectors, and the projections when ``save_projection``
    (``base_model.vera_A`` / ``_B``; PVeRA's ``base_model.pvera_A`` / ``_B``)."""
    out = layer_state_dict(model, adapter_name, config, layer_type=VeraLayer, key_mapping=key_mapping,
                           save_embedding_layers=save_embedding_layers)
    if config.save_projection:
        flavour, vera_a, vera_b = _shared(model, adapter_name)
        for key, var in zip(flavour.keys(), (vera_a, vera_b)):
            out[key] = np.asarray(var.get_value(), np.float32)
    return out


def load_vera_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Fills an injected VeRA (or PVeRA) adapter from PEFT's keys, the shared projections included.

    With ``save_projection=True`` the file must hold ``base_model.vera_A`` / ``base_model.vera_B``
    (PVeRA: ``pvera_``; PEFT's error otherwise); with ``False`` the projections drawn at injection
    (PEFT's own values) stay, and projections found in the file are ignored with PEFT's warning.

    Raises:
      AdapterFileError: the projections are missing though ``save_projection`` is set, or have the
        wrong shape (names the key, expected and found shapes).
    """
    tensors = dict(tensors)
    flavour, vera_a, vera_b = _shared(model, adapter_name)
    keys, p = flavour.keys(), flavour.prefix
    found = {k: tensors.pop(k) for k in keys if k in tensors}
    layers = adapter_layers(model, VeraLayer, adapter_name)
    save_projection = next(iter(layers.values())).spec(adapter_name).save_projection
    if save_projection:
        missing = [k for k in keys if k not in found]
        if missing:
            raise AdapterFileError(
                f"{source}: Specified to load {p}_A and {p}_B from state dictionary however they were not "
                f"present! (save_projection is true in the config, but {missing} are not in the file)"
            )
        for key, var in zip(keys, (vera_a, vera_b)):
            current = var.get_value()
            if tuple(found[key].shape) != current.shape:
                raise AdapterFileError(f"{source}: {key}: expected shape {list(current.shape)} (r and the largest "
                                       f"targeted layer), found {list(found[key].shape)}")
            var.set_value(jnp.asarray(np.asarray(found[key]), current.dtype))
    elif found:
        warnings.warn(
            f"{source}: Specified to not load {p}_A and {p}_B from state dictionary however they are present in "
            "state dictionary! They are ignored: the projections are regenerated from projection_prng_key, as PEFT "
            "does.",
            stacklevel=3,
        )
    return load_layer_state_dict(model, tensors, adapter_name, layer_type=VeraLayer, key_mapping=key_mapping,
                                 source=source)
