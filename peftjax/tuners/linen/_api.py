"""``peftjax.linen``'s entry points: LoRA configs and specs go to LoRA's Linen path, the weight-delta
methods (LoHa, LoKr, VeRA, FourierFT, AdaLoRA) and IA³'s rescaling to :mod:`peftjax.tuners.linen._delta`.

AdaLoRA's config subclasses ``LoraConfig``, so the weight-delta check comes first. Methods that are
not one of these (OFT, BOFT, prompt learning, ...) are refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from peftjax.config import CONFIG_NAME, LoraConfig, load_config
from peftjax.io._adapter import KeyMapping
from peftjax.tuners.linen import _delta
from peftjax.tuners.linen._delta import LinenDeltaSpec
from peftjax.tuners.linen._methods import is_delta_config
from peftjax.tuners.lora import _linen as _lora

SUPPORTED = "LoRA (with DoRA, lora_bias, rsLoRA, PiSSA/OLoRA...), LoHa, LoKr, VeRA, FourierFT, AdaLoRA and IA³"


def _refuse(config) -> TypeError:
    return TypeError(f"peftjax.linen adapts {SUPPORTED}; a {type(config).__name__} is not one of them (use the NNX "
                     "path, peftjax.get_peft_model, for it)")


def inject(module: nn.Module, params: Mapping, config, *, sample_args: Sequence[Any] = (),
           sample_kwargs: Mapping[str, Any] | None = None, key: jax.Array, adapter_name: str = "default",
           spec=None):
    """Adds adapter ``adapter_name`` to every layer ``config`` targets; returns ``(params, spec)``.

    ``config`` is a ``LoraConfig`` (see ``peftjax.tuners.lora._linen.inject`` for the details,
    DoRA and ``modules_to_save`` included) or a ``LoHaConfig``, ``LoKrConfig``, ``VeraConfig``,
    ``FourierFTConfig``, ``AdaLoraConfig`` or ``IA3Config`` (linear layers only; their weights are stored under
    PEFT's attribute names next to the kernel, e.g. ``hada_w1_a/<adapter>``). ``spec`` adds the
    adapter to earlier ones of the same method.

    Raises:
      TypeError: another PEFT method (OFT, BOFT, ...), or a targeted layer the method cannot adapt.
      NotImplementedError: an option the Linen path does not implement (named).
      ValueError: nothing matches ``target_modules`` (the closest names are listed), and the other
        checks of the method's path.
    """
    kwargs = dict(sample_args=sample_args, sample_kwargs=sample_kwargs, key=key, adapter_name=adapter_name)
    if is_delta_config(config):
        if spec is not None and not isinstance(spec, LinenDeltaSpec):
            raise ValueError(f"the spec holds LoRA adapters; a {type(config).__name__} adapter cannot join them")
        return _delta.inject(module, params, config, spec=spec, **kwargs)
    if isinstance(config, LoraConfig):
        if isinstance(spec, LinenDeltaSpec):
            raise ValueError(f"the spec holds {spec.peft_type} adapters; a LoRA adapter cannot join them")
        return _lora.inject(module, params, config, spec=spec, **kwargs)
    raise _refuse(config)


def intercept(spec, rows=None):
    """Adds the active adapters to the targeted layers' ``__call__`` while the block runs (a context manager).

    For a LoRA spec see ``peftjax.tuners.lora._linen.intercept`` (mixed batches with ``rows``); for
    the weight-delta methods ``_delta.intercept`` (``rows`` is refused: PEFT's mixed batches are
    LoRA's).
    """
    if isinstance(spec, LinenDeltaSpec):
        if rows is not None:
            raise NotImplementedError(f"rows (a mixed batch) is supported for LoRA adapters, not {spec.peft_type}")
        return _delta.intercept(spec)
    return _lora.intercept(spec, rows)


def merge_and_unload(params: Mapping, spec, adapter_names: Sequence[str] | None = None) -> dict:
    """Folds the adapters (the active ones by default) into the kernels and drops every adapter leaf."""
    if isinstance(spec, LinenDeltaSpec):
        return _delta.merge_and_unload(params, spec, adapter_names)
    return _lora.merge_and_unload(params, spec, adapter_names)


def save_adapter(directory: str | os.PathLike, params: Mapping, spec, config, *, adapter_name: str = "default",
                 key_mapping: KeyMapping = None) -> Path:
    """Writes adapter ``adapter_name`` as HF PEFT files (``PeftModel.from_pretrained`` loads them)."""
    if isinstance(spec, LinenDeltaSpec):
        return _delta.save_adapter(directory, params, spec, config, adapter_name=adapter_name,
                                   key_mapping=key_mapping)
    if is_delta_config(config):
        raise ValueError(f"config is a {type(config).__name__}, but the spec holds LoRA adapters")
    return _lora.save_adapter(directory, params, spec, config, adapter_name=adapter_name, key_mapping=key_mapping)


def load_adapter(directory: str | os.PathLike, module: nn.Module | None, params: Mapping, *,
                 sample_args: Sequence[Any] = (), sample_kwargs: Mapping[str, Any] | None = None, spec=None,
                 adapter_name: str = "default", key_mapping: KeyMapping = None, config=None,
                 key: jax.Array | None = None, allow_pickle: bool = False):
    """Reads HF PEFT files (PEFT's or ``save_adapter``'s) into Linen params; returns ``(params, spec)``.

    The method is the file's ``peft_type`` (or ``config``'s): LoRA, LoHa, LoKr, VeRA, FourierFT
    AdaLoRA or IA³; others raise ``TypeError``.
    """
    if config is None and (Path(directory) / CONFIG_NAME).is_file():  # else LoRA's path names what is missing
        config = load_config(directory)
    kwargs = dict(sample_args=sample_args, sample_kwargs=sample_kwargs, spec=spec, adapter_name=adapter_name,
                  key_mapping=key_mapping, config=config, key=key, allow_pickle=allow_pickle)
    if is_delta_config(config):
        if spec is not None and not isinstance(spec, LinenDeltaSpec):
            raise ValueError(f"the spec holds LoRA adapters; a {type(config).__name__} adapter cannot join them")
        return _delta.load_adapter(directory, module, params, **kwargs)
    if config is None or isinstance(config, LoraConfig):
        if isinstance(spec, LinenDeltaSpec):
            raise ValueError(f"the spec holds {spec.peft_type} adapters; a LoRA adapter cannot join them")
        return _lora.load_adapter(directory, module, params, **kwargs)
    raise _refuse(config)
