"""The API HF PEFT users know — ``get_peft_model``, ``PeftModel`` — over peftjax's functional core.

A ``PeftModel`` holds the NNX model whose layers carry the adapters (``.base_model``), the config
of each adapter, and which one is active. Calling it calls the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from peftjax.config import PeftConfig, load_config
from peftjax.io._adapter import KeyMapping, adapter_dir, read_adapter_weights, write_adapter
from peftjax.tuners import _lora
from peftjax.tuners._registry import tuner_for
from peftjax.tuners._variables import TRAINABLE


def _to_host(x):
    """A NumPy copy of ``x``; an array split across processes is all-gathered (a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


class PeftModel:
    """A model with one or more named adapters, mirroring ``peft.PeftModel``.

    Attributes:
      base_model: the NNX model, with adapter weights beside the weights they adapt.
      peft_config: ``{adapter name: config}``, with targets resolved.
      active_adapter: the adapter the forward uses.
    """

    def __init__(
        self,
        model: nnx.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        *,
        key: jax.Array | None = None,
        key_mapping: KeyMapping = None,
    ):
        self.base_model = model
        self._disabled = False
        self.peft_config: dict[str, PeftConfig] = {}
        self.key_mapping = key_mapping
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, peft_config, key=key)
        self.set_adapter(adapter_name)

    # ------------------------------------------------------------ adapters

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, *, key: jax.Array | None = None) -> None:
        """Adds a freshly initialised adapter; it does not become active (as in PEFT)."""
        _lora.validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first")
        config = peft_config
        tuner = tuner_for(config)
        if key is None:  # deterministic default, distinct per adapter name
            key = jax.random.fold_in(jax.random.key(0), sum(adapter_name.encode()))
        self.peft_config[adapter_name] = tuner.inject(self.base_model, config, adapter_name=adapter_name, key=key)
        _lora.set_active_adapters(self.base_model, (self.active_adapter,))
        if config.inference_mode:
            _lora.set_adapter_trainable(self.base_model, adapter_name, False)

    def set_adapter(self, adapter_name: str) -> None:
        """Makes ``adapter_name`` the active adapter."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        _lora.set_active_adapters(self.base_model, (adapter_name,))

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter's weights and config."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        _lora.delete_adapter(self.base_model, adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)
            _lora.set_active_adapters(self.base_model, (self.active_adapter,) if self.active_adapter else ())

    @contextlib.contextmanager
    def disable_adapter(self):
        """Runs the plain base model inside the block (merged adapters are unmerged first)."""
        _lora.unmerge(self.base_model)
        _lora.set_adapters_disabled(self.base_model, True)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            _lora.set_adapters_disabled(self.base_model, False)

    # ------------------------------------------------------------ forward

    def _active_tuner(self):
        config = self.peft_config.get(self.active_adapter)
        return None if config is None or self._disabled else tuner_for(config)

    def __call__(self, *args, **kwargs):
        tuner = self._active_tuner()
        if tuner is not None and tuner.forward is not None:
            return tuner.forward(self, self.active_adapter, args, kwargs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        if not hasattr(self.base_model, "generate"):
            raise TypeError(f"{type(self.base_model).__name__} has no generate method")
        tuner = self._active_tuner()
        if tuner is not None and tuner.generate is not None:
            return tuner.generate(self, self.active_adapter, args, kwargs)
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        # attributes of the wrapped model (config, ...), as PEFT forwards them
        if name == "base_model" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base_model, name)

    # ------------------------------------------------------------ parameters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, adapters included in ``all`` as PEFT counts them."""
        return _count(nnx.state(self.base_model, TRAINABLE)), _count(nnx.state(self.base_model, nnx.Param))

    def print_trainable_parameters(self) -> None:
        """Prints e.g. ``trainable params: 3,584 || all params: 110,400 || trainable%: 3.2464``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Folds the active (or named) adapters into the base weights; reversible."""
        _lora.merge(self.base_model, tuple(adapter_names) if adapter_names else None)

    def unmerge_adapter(self) -> None:
        _lora.unmerge(self.base_model)

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nnx.Module:
        """Merges the active adapters and returns the bare model (no adapter layers left)."""
        return _lora.unload(
            self.base_model, merge_first=True, adapter_names=tuple(adapter_names) if adapter_names else None
        )

    def unload(self) -> nnx.Module:
        """Removes every adapter without merging and returns the bare model."""
        _lora.unmerge(self.base_model)
        return _lora.unload(self.base_model, merge_first=False)

    # ------------------------------------------------------------ files

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
    ) -> None:
        """Writes each adapter as HF PEFT does (``default`` at the top, others in subfolders).

        Sharded adapters are gathered first. On several hosts every process must call this (the
        gather is collective) and only process 0 writes the files.
        """
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapters {unknown}; adapters: {sorted(self.peft_config)}")
        for name in names:
            config = self._config_for_saving(self.peft_config[name])
            tensors = tuner_for(config).state_dict(
                self.base_model, name, config, key_mapping=self.key_mapping,
                save_embedding_layers=save_embedding_layers,
            )
            tensors = {k: _to_host(v) for k, v in tensors.items()}
            if jax.process_index() == 0:
                write_adapter(adapter_dir(save_directory, name), config, tensors)

    def _config_for_saving(self, config: PeftConfig) -> PeftConfig:
        hf = getattr(getattr(self.base_model, "config", None), "hf_config", None)
        updates = {"inference_mode": True}
        if hf is not None:
            updates["base_model_name_or_path"] = config.base_model_name_or_path or (
                getattr(hf, "_name_or_path", None) or None
            )
            if config.task_type is None:
                kind = hf.model_type
                updates["auto_mapping"] = {
                    "base_model_class": type(self.base_model).__name__,
                    "parent_library": f"transformers.models.{kind}.modeling_{kind}",
                }
        return dataclasses.replace(config, **updates)

    @classmethod
    def from_pretrained(
        cls,
        model: nnx.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        *,
        key_mapping: KeyMapping = None,
        allow_pickle: bool = False,
    ) -> PeftModel:
        """Loads a saved adapter (HF PEFT's or peftjax's) onto ``model``.

        Args:
          model: the base NNX model (modified in place).
          model_id: the adapter directory (``adapter_config.json`` + weights).
          adapter_name: the name to give the adapter.
          is_trainable: keep the adapter trainable (otherwise it is frozen for inference).
          config: use this config instead of the directory's.
          key_mapping: module-name mapping for user models (see ``peftjax.io``).
          allow_pickle: allow reading ``adapter_model.bin`` (pickle) when no safetensors exists.
        """
        config = config or load_config(model_id)
        peft = cls.__new__(cls)
        peft.base_model, peft.peft_config, peft.key_mapping, peft.active_adapter = model, {}, key_mapping, adapter_name
        peft._disabled = False
        peft._load(model_id, adapter_name, config, is_trainable=is_trainable, allow_pickle=allow_pickle, warn=True)
        peft.set_adapter(adapter_name)
        return peft

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        allow_pickle: bool = False,
    ) -> tuple[list[str], list[str]]:
        """Loads another saved adapter under ``adapter_name`` (not activated); returns (missing, unexpected)."""
        return self._load(model_id, adapter_name, load_config(model_id), is_trainable=is_trainable,
                          allow_pickle=allow_pickle, warn=False)

    def _load(self, model_id, adapter_name, config, *, is_trainable, allow_pickle, warn):
        tuner = tuner_for(config)
        # read and check the files before touching the model
        tensors = read_adapter_weights(model_id, allow_pickle=allow_pickle)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        self.add_adapter(adapter_name, config)
        try:
            missing, unexpected = tuner.load_state_dict(
                self.base_model, tensors, adapter_name, key_mapping=self.key_mapping, source=str(Path(model_id))
            )
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if missing and warn:
            warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}", stacklevel=3)
        return missing, unexpected


def get_peft_model(
    model: nnx.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    *,
    key: jax.Array | None = None,
    key_mapping: KeyMapping = None,
) -> PeftModel:
    """Adds a new adapter to ``model`` (in place) and wraps it, like ``peft.get_peft_model``.

    Args:
      model: a bundled peftjax model or any NNX model built from ``nnx.Linear``/``nnx.Embed``.
      peft_config: e.g. ``LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])``.
      adapter_name: the adapter's name.
      key: the init key; the default is fixed, so the result is deterministic.
      key_mapping: maps the model's module paths to HF names in saved files (user models).

    >>> peft_model = get_peft_model(model, LoraConfig(r=8, task_type="CAUSAL_LM"))  # doctest: +SKIP
    >>> peft_model.print_trainable_parameters()  # doctest: +SKIP
    trainable params: 3,584 || all params: 110,400 || trainable%: 3.2464
    """
    return PeftModel(model, peft_config, adapter_name, key=key, key_mapping=key_mapping)
