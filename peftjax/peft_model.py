"""The API HF PEFT users know — ``get_peft_model``, ``PeftModel`` — over peftjax's functional core.

A ``PeftModel`` holds the NNX model whose layers carry the adapters (``.base_model``), the config
of each adapter, and which one is active. Calling it calls the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from peftjax.config import PeftConfig, load_config
from peftjax.config._targeting import module_names_as
from peftjax.io._adapter import KeyMapping, adapter_dir, map_name, read_adapter_weights, write_adapter
from peftjax.io._hub import resolve
from peftjax.models._generation import rows_per_input
from peftjax.nn._graph import iter_modules
from peftjax.tuners import base as tuner_base
from peftjax.tuners._registry import default_key, tuner_for
from peftjax.tuners.base import TRAINABLE
from peftjax.tuners.base._vocabulary import load_vocabulary_weights, vocabulary_state_dict
from peftjax.tuners.lora import LoraLayer, _combine
from peftjax.tuners.lora._arrow import refresh_arrow


def _to_host(x):
    """A NumPy copy of ``x``; an array split across processes is all-gathered (a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _batch_size(args, kwargs) -> int | None:
    """The batch size of a model call: its first array argument's leading axis."""
    for x in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if x is not None and hasattr(x, "shape") and len(x.shape):
            return int(x.shape[0])
    return None


def _check_row_names(adapter_names, batch_size: int | None) -> None:
    """``adapter_names`` is a list of names, one per row of a batch of ``batch_size`` (PEFT's message)."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, list | tuple):
        raise TypeError(f"adapter_names: expected a list of str, one per row, got {adapter_names!r}")
    if batch_size is not None and len(adapter_names) != batch_size:
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {batch_size} respectively."
        )


def _count(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


# the methods whose layers can run a different adapter per batch row (PEFT: LoRA only)
MIXED_BATCH_TYPES = ("LORA", "IA3", "ROAD", "GLORA")


class DonatedAdapterError(RuntimeError):
    """The model's adapter buffers were donated to a train step and never written back."""


class AdapterKeyError(ValueError):
    """An adapter file's keys do not fit the model it is loaded onto."""


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
        # a model read from a vision-language checkpoint names its modules as that class does
        self.key_mapping = key_mapping if key_mapping is not None else getattr(model, "adapter_key_mapping", None)
        self.active_adapter = adapter_name
        self._active_adapters = [adapter_name]
        self.add_adapter(adapter_name, peft_config, key=key)
        self.set_adapter(adapter_name, inference_mode=peft_config.inference_mode)

    # ------------------------------------------------------------ adapters

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, *, key: jax.Array | None = None) -> None:
        """Adds a freshly initialised adapter; it does not become active (as in PEFT)."""
        tuner_base.validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first")
        config = peft_config
        tuner = tuner_for(config)
        key = default_key(adapter_name) if key is None else key
        # targets match the module names the files carry (a vision-language class's, with its key mapping)
        view = None if self.key_mapping is None else partial(map_name, key_mapping=self.key_mapping)
        with module_names_as(view):
            self.peft_config[adapter_name] = tuner.inject(self.base_model, config, adapter_name=adapter_name, key=key)
        tuner_base.set_active_adapters(self.base_model, tuple(self.active_adapters))
        if config.inference_mode:
            tuner_base.set_adapter_trainable(self.base_model, adapter_name, False)
        if not tuner_base.adding_from_file():  # a file's weights come first (see _load)
            refresh_arrow(self)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Makes ``adapter_name`` the active adapter, or a list of names several at once.

        As in PEFT, the active adapters of layer methods become trainable and the others
        frozen; with ``inference_mode`` the active ones are frozen too.

        Several active adapters add their outputs, as PEFT's ``LoraModel.set_adapter([...])``
        does; they must be of one layer method (LoRA, IA³, bottleneck), and at most one of them
        may own a ``modules_to_save`` copy of a given module.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"no adapter {unknown[0] if unknown else adapter_name!r}; adapters: {sorted(self.peft_config)}")
        if len(names) > 1:
            types = {self.peft_config[n].peft_type for n in names}
            if "ADAPTION_PROMPT" in types:
                raise ValueError(f"set_adapter({names}): adaption prompts run one at a time, as in PEFT (\"Unable to "
                                 "stack multiple adaption prompts\"); pass one adapter name")
            if len(types) > 1 or self.peft_config[names[0]].is_prompt_learning:
                raise ValueError(
                    f"set_adapter({names}): several active adapters must be of one layer method (LoRA, IA3 or "
                    f"bottleneck), found {sorted(types)}"
                )
            for path, module in tuner_base.named_modules(self.base_model).items():
                owners = [n for n in names if n in getattr(module, "modules_to_save", ())]
                if isinstance(module, tuner_base.SavedModule) and len(owners) > 1:
                    raise ValueError(
                        f"set_adapter({names}): {owners} each have a modules_to_save copy of {path}; only one "
                        "can replace it"
                    )
        self.active_adapter = names[0]
        self._active_adapters = names
        tuner_base.set_active_adapters(self.base_model, tuple(names))
        for name, config in self.peft_config.items():
            if not config.is_prompt_learning:
                tuner_base.set_adapter_trainable(self.base_model, name, name in names and not inference_mode)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters (several after ``set_adapter([...])``)."""
        return list(self._active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes an adapter's weights and config."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        tuner_base.delete_adapter(self.base_model, adapter_name)
        del self.peft_config[adapter_name]
        refresh_arrow(self)
        self._active_adapters = [n for n in self._active_adapters if n != adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = self._active_adapters[0] if self._active_adapters else next(iter(self.peft_config), None)
            self._active_adapters = [self.active_adapter] if self.active_adapter else []
            tuner_base.set_active_adapters(self.base_model, (self.active_adapter,) if self.active_adapter else ())

    @contextlib.contextmanager
    def disable_adapter(self):
        """Runs the plain base model inside the block (merged adapters are unmerged first)."""
        tuner_base.unmerge(self.base_model)
        tuner_base.set_adapters_disabled(self.base_model, True)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            tuner_base.set_adapters_disabled(self.base_model, False)

    # ------------------------------------------------------------ forward

    def _active_tuner(self):
        config = self.peft_config.get(self.active_adapter)
        return None if config is None or self._disabled else tuner_for(config)

    def __call__(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """Runs the model with the active adapter, or with ``adapter_names``: one adapter per row.

        ``adapter_names`` (PEFT's mixed batch) names each row's LoRA adapter, ``"__base__"`` for
        none; rows are computed together, and any assignment of a given batch size reuses one
        compiled function (see :meth:`mixed_batch` for a jitted function of the model).
        """
        self._check_live("run the model")
        if adapter_names is not None:
            with self.mixed_batch(adapter_names, _batch_size(args, kwargs)):
                return self.base_model(*args, **kwargs)
        tuner = self._active_tuner()
        if tuner is not None and tuner.forward is not None:
            return tuner.forward(self, self.active_adapter, args, kwargs)
        return self.base_model(*args, **kwargs)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str], batch_size: int | None = None):
        """Inside the block, row ``i`` of every call uses adapter ``adapter_names[i]``.

        The assignment is model state (an index per row), so an ``nnx.jit``-ed function of the
        model compiles once for every assignment of a given batch size.

        Raises:
          ValueError: an unknown name, a length other than ``batch_size``, an adapter with DoRA
            (PEFT's messages), or a non-LoRA adapter.
        """
        _check_row_names(adapter_names, batch_size)
        tuner_base.adapter_index(adapter_names, tuple(self.peft_config))  # unknown names, before anything runs
        for name in dict.fromkeys(n for n in adapter_names if n in self.peft_config):
            config = self.peft_config[name]
            if getattr(config, "is_prompt_learning", False):
                raise ValueError("Cannot pass `adapter_names` when using prompt learning.")
            if config.peft_type not in MIXED_BATCH_TYPES:
                raise ValueError(f"adapter_names: {name!r} is a {config.peft_type} adapter; mixed batches take "
                                 f"{', '.join(MIXED_BATCH_TYPES)} adapters")
            if getattr(config, "use_dora", False):
                raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
        # every adapter that can serve a row, whichever are used: the same state structure (and
        # so the same compiled function) for every assignment
        names = tuple(n for n, c in self.peft_config.items()
                      if c.peft_type in MIXED_BATCH_TYPES and not getattr(c, "use_dora", False))
        tuner_base.set_adapter_rows(self.base_model, list(adapter_names), names)
        try:
            yield self
        finally:
            tuner_base.clear_adapter_rows(self.base_model)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if not hasattr(self.base_model, "generate"):
            raise TypeError(f"{type(self.base_model).__name__} has no generate method")
        self._check_live("generate")
        if adapter_names is not None:
            _check_row_names(adapter_names, _batch_size(args, kwargs))
            # beams and returned sequences repeat each input row: its adapter with it (as PEFT's)
            times = rows_per_input(self.base_model, kwargs)
            with self.mixed_batch([name for name in adapter_names for _ in range(times)]):
                return self.base_model.generate(*args, **kwargs)
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
        """``(trainable, all)`` parameter counts, adapters included in ``all`` as PEFT counts them.

        PEFT swaps inactive adaption prompts out of the model, so they count in neither number. A
        quantized linear's weight counts its ``in x out`` entries, as PEFT counts bitsandbytes' packed
        weights (the codes are not parameters here).
        """
        from peftjax.quantization import quantized_linears

        total = _count(nnx.state(self.base_model, nnx.Param))
        total += sum(m.weight_entries() for m in quantized_linears(self.base_model).values() if m.float_kernel is None)
        for layer in tuner_base.adapter_layers(self.base_model).values():
            for name in set(layer.adapter_names()) - set(self.active_adapters):
                if getattr(self.peft_config.get(name), "peft_type", None) == "ADAPTION_PROMPT":
                    total -= sum(_count(store[name].get_value()) for store in layer.adapter_variable_dicts())
        return _count(nnx.state(self.base_model, TRAINABLE)), total

    def print_trainable_parameters(self) -> None:
        """Prints e.g. ``trainable params: 3,584 || all params: 110,400 || trainable%: 3.2464``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------ the functional core

    def update(self, trainable: nnx.State) -> PeftModel:
        """Writes trained weights from the functional core back into the model; returns ``self``.

        ``make_train_step`` donates the adapter buffers it is given, so after training through
        ``peftjax.split`` the model still points at deleted arrays until this puts the step's
        result back. Then ``save_pretrained``, ``merge_and_unload`` and calls see the trained values.

        Args:
          trainable: the adapter state returned by the step (same tree as ``split``'s second output).

        >>> graphdef, adapters, base = peftjax.split(peft_model.base_model)  # doctest: +SKIP
        >>> adapters, opt_state, loss = step(adapters, opt_state, base, batch, key)  # doctest: +SKIP
        >>> peft_model.update(adapters).save_pretrained("out/adapter")  # doctest: +SKIP
        """
        self._check_trainable(trainable, "update(trainable)")
        nnx.update(self.base_model, trainable)
        return self

    def _check_trainable(self, trainable: nnx.State, what: str) -> None:
        expected = nnx.state(self.base_model, TRAINABLE)
        want, got = jax.tree.structure(expected), jax.tree.structure(trainable)
        if want != got:
            have, given = _leaf_paths(expected), _leaf_paths(trainable)
            raise ValueError(
                f"{what} takes the trainable state that peftjax.split(peft_model.base_model) returned "
                f"(and the train step hands back); not in the model: {sorted(given - have)[:5]}, "
                f"missing from the argument: {sorted(have - given)[:5]}"
            )
        deleted = _deleted_paths(trainable)
        if deleted:
            raise DonatedAdapterError(
                f"{what} got arrays that were already donated to a train step ({deleted[0]}, ...): "
                "pass the state the step returned, not the one you gave it"
            )

    def _check_live(self, action: str) -> None:
        deleted = _deleted_paths(nnx.state(self.base_model, TRAINABLE))
        if deleted:
            raise DonatedAdapterError(
                f"cannot {action}: the adapter weights of this PeftModel ({deleted[0]}, ...) were donated to a "
                "jitted train step (peftjax.make_train_step donates them) and no longer exist; call "
                "peft_model.update(trainable) with the state the step returned first"
            )

    # ------------------------------------------------------------ merging

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Folds the active (or named) adapters into the base weights; reversible.

        ``safe_merge`` checks the merged weights for NaN/inf and, finding any, leaves the model
        as it was and raises ``ValueError``.
        """
        self._check_live("merge the adapters")
        tuner_base.merge(self.base_model, tuple(adapter_names) if adapter_names else None, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        tuner_base.unmerge(self.base_model)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        *,
        key: jax.Array | None = None,
    ) -> None:
        """Adds ``adapter_name``, the LoRA adapters ``adapters`` combined with ``weights``, as PEFT does.

        ``combination_type`` is one of PEFT's: ``svd``, ``linear``, ``cat``, ``ties``, ``ties_svd``,
        ``dare_ties``, ``dare_linear``, ``dare_ties_svd``, ``dare_linear_svd``, ``magnitude_prune``,
        ``magnitude_prune_svd`` (the rules are public in ``peftjax.tuners.lora``). The new
        adapter has rank ``r = lora_alpha =`` the combined rank (equal ranks for ``linear``,
        ``ties``, ``dare_*`` and ``magnitude_prune``; their sum for ``cat``; ``svd_rank`` or the
        largest for the ``*svd`` types), targets the union of the targets, is frozen and is not
        activated, as in PEFT. ``svd_full_matrices`` does not change the result and
        ``svd_driver`` is torch's CUDA option; both are accepted for PEFT's signature.

        Args:
          key: draws DARE's random pruning masks (PEFT draws them from torch's global RNG).

        Raises:
          ValueError: ``adapter_name`` exists (PEFT returns silently, leaving the old adapter),
            an unknown adapter, a non-LoRA or DoRA adapter, ``weights`` of another length,
            ranks that the type cannot combine, a missing ``density``, or several of the
            adapters owning ``modules_to_save`` copies of one module.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it or choose another name")
        if not adapters:
            raise ValueError("add_weighted_adapter: adapters is empty")
        for name in adapters:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} does not exist (adapters: {sorted(self.peft_config)})")
            config = self.peft_config[name]
            if config.peft_type != "LORA" or config.use_dora:
                what = "a DoRA" if config.peft_type == "LORA" else f"a {config.peft_type}"
                raise ValueError(f"add_weighted_adapter: {name!r} is {what} adapter; only plain LoRA adapters combine")
            if config.target_parameters:  # PEFT's refusal
                raise ValueError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter "
                                 f"'{name}')")
        if len(weights) != len(adapters):
            raise ValueError(f"weights: expected one per adapter ({len(adapters)}), got {len(weights)}")
        if combination_type not in _combine.COMBINATION_TYPES:
            raise ValueError(f"Invalid combination_type: {combination_type} (one of {', '.join(_combine.COMBINATION_TYPES)})")
        if majority_sign_method not in ("total", "frequency"):
            raise ValueError(f"majority_sign_method: expected 'total' or 'frequency', got {majority_sign_method!r}")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        if density is None and combination_type.removesuffix("_svd") in (
            "ties", "dare_ties", "dare_linear", "magnitude_prune"
        ):
            raise ValueError(f"combination_type={combination_type!r} prunes: pass density (a fraction in [0, 1])")
        for path, module in tuner_base.named_modules(self.base_model).items():
            owners = [n for n in adapters if n in getattr(module, "modules_to_save", ())]
            if isinstance(module, tuner_base.SavedModule) and len(owners) > 1:
                raise ValueError(
                    "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                    f"{path} with copies for {owners}."
                )
        configs = [self.peft_config[n] for n in adapters]
        # the largest rank each adapter holds on a layer: PEFT's max(r, *rank_pattern.values()), or
        # the padded rank after prepare_model_for_compiled_hotswap
        lora_layers = [m for m in tuner_base.named_modules(self.base_model).values() if isinstance(m, LoraLayer)]
        ranks = [max((m.spec(n).r for m in lora_layers if n in m.adapter_names()), default=0) for n in adapters]
        if combination_type in _combine.SAME_RANK:
            if len(set(ranks)) != 1:
                raise ValueError(
                    "All adapters must have the same r value when using combination_type linear, ties, dare_ties or "
                    f"dare_linear (ranks: {dict(zip(adapters, ranks))})."
                )
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        else:
            new_rank = svd_rank or max(ranks)
        targets = [c.target_modules for c in configs]
        if len({isinstance(t, str) for t in targets}) > 1:
            raise ValueError(
                "all adapter configs should follow the same target modules type. "
                "Combining adapters with `target_modules` type being a mix of list/set and string is not supported."
            )
        if isinstance(targets[0], str):
            new_targets = "|".join(f"({t})" for t in targets)
        else:
            new_targets = tuple(dict.fromkeys(name for t in targets for name in t))
        # the factors are overwritten below; a decomposing init would rewrite the base weights. MiCA's
        # stays, as in PEFT (whose config is the first adapter's): the combined adapter's B is frozen too
        init = "mica" if configs[0].init_lora_weights == "mica" else True
        new_config = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=new_targets,
                                         alpha_pattern={}, rank_pattern={}, init_lora_weights=init)
        with tuner_base.adapter_from_file():  # its factors are set below; an Arrow router sees them after
            self.add_adapter(adapter_name, new_config)
        key = jax.random.key(0) if key is None else key
        layers = [m for m in tuner_base.named_modules(self.base_model).values()
                  if isinstance(m, LoraLayer) and adapter_name in m.adapter_names()]
        for i, layer in enumerate(layers):
            a, b = _combine.combined_factors(layer, combination_type, adapters, weights, new_rank, density=density,
                                    majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                                    key=jax.random.fold_in(key, i))
            for store, value in ((layer.lora_A, a), (layer.lora_B, b)):
                current = store[adapter_name].get_value()
                store[adapter_name].set_value(value.astype(current.dtype).reshape(current.shape))
        tuner_base.set_adapter_trainable(self.base_model, adapter_name, False)
        refresh_arrow(self)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None,
        *, dequantize: bool = False,
    ) -> nnx.Module:
        """Merges the active (or named) adapters and returns the bare model (no adapter layers left).

        PEFT's signature; ``progressbar`` is accepted and ignored. With ``safe_merge`` a merge that
        produces NaN/inf raises ``ValueError`` and leaves the model (adapters included) as it was.

        On a quantized base (``peftjax.quantization``) the merged weights are quantized again, with
        PEFT's warning about rounding; with ``dequantize=True`` they are merged into the dequantized
        weights instead and the model comes back in floating point (each layer's compute dtype),
        as transformers' ``model.dequantize()`` followed by the merge.
        """
        self._check_live("merge the adapters")
        names = tuple(adapter_names) if adapter_names else None
        if safe_merge:
            tuner_base.merge(self.base_model, names, safe_merge=True)
        if not dequantize:
            return tuner_base.unload(self.base_model, merge_first=True, adapter_names=names)
        from peftjax.quantization import dequantize_model, quantized_linears

        layers = list(quantized_linears(self.base_model).values())
        for layer in layers:
            layer.keep_float = True
        try:
            model = tuner_base.unload(self.base_model, merge_first=True, adapter_names=names)
        finally:
            for layer in layers:
                layer.keep_float = False
        return dequantize_model(model)

    def unload(self) -> nnx.Module:
        """Removes every adapter without merging and returns the bare model."""
        tuner_base.unmerge(self.base_model)
        return tuner_base.unload(self.base_model, merge_first=False)

    def get_layer_status(self) -> list[tuner_base.TunerLayerStatus]:
        """Each adapter layer's status, with PEFT's fields (``name``, ``module_type``, ``enabled``,
        ``active_adapters``, ``merged_adapters``, ``requires_grad``, ``available_adapters``, ``devices``)."""
        self._check_status()
        statuses = tuner_base.get_layer_status(self.base_model)
        for status in statuses:  # as in PEFT, every adapter layer reports the model's active adapters
            if status.module_type != "ModulesToSaveWrapper":
                status.active_adapters = list(self.active_adapters)
        return statuses

    def get_model_status(self) -> tuner_base.TunerModelStatus:
        """The model's status, with PEFT's fields; ``"irregular"`` where the layers disagree."""
        self._check_status()
        trainable, total = self.get_nb_trainable_parameters()
        types = {n: c.peft_type for n, c in self.peft_config.items()}
        tuner = {"LORA": "LoraModel", "IA3": "IA3Model", "VERA": "VeraModel", "FOURIERFT": "FourierFTModel",
                 "LN_TUNING": "LNTuningModel", "LOHA": "LoHaModel", "LOKR": "LoKrModel"}.get(
            types[self.active_adapter], f"{types[self.active_adapter].title()}Model")
        return tuner_base.get_model_status(
            self.base_model, base_model_type=type(self.base_model).__name__, adapter_model_type=tuner,
            peft_types=types, trainable_params=trainable, total_params=total, layers=self.get_layer_status(),
        )

    def _check_status(self) -> None:
        if any(c.is_prompt_learning or c.peft_type == "ADAPTION_PROMPT" for c in self.peft_config.values()):
            raise TypeError("get_layer_status() got an invalid PeftModel instance; prefix tuning and adaption prompt "
                            "are not supported.")

    # ------------------------------------------------------------ files

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
    ) -> None:
        """Writes each adapter as HF PEFT does (``default`` at the top, others in subfolders).

        Sharded adapters are gathered first. On several hosts every process must call this (the
        gather is collective) and only process 0 writes the files.

        Args:
          save_directory: where to write.
          selected_adapters: the adapters to write (default: all).
          save_embedding_layers: ``"auto"``, ``True`` or ``False``, as PEFT's.
          path_initial_model_for_weight_conversion: for a PiSSA, OLoRA or LoftQ adapter, the
            directory where it was saved right after ``get_peft_model`` (before training): the
            adapter is then written as a plain LoRA of twice the rank that applies to the
            *original* base model, here and in PEFT (``tuners.lora._convert``).

        >>> peft_model.save_pretrained("pissa_init")                       # doctest: +SKIP
        >>> ...  # train                                                   # doctest: +SKIP
        >>> peft_model.save_pretrained("pissa_as_lora", path_initial_model_for_weight_conversion="pissa_init")  # doctest: +SKIP
        """
        self._check_live("save the adapters")
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapters {unknown}; adapters: {sorted(self.peft_config)}")
        for name in names:
            config = self._config_for_saving(self.peft_config[name])
            tensors = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            if path_initial_model_for_weight_conversion is not None and jax.process_index() == 0:
                from peftjax.tuners.lora._convert import convert_to_plain_lora

                config, tensors = convert_to_plain_lora(config, tensors, path_initial_model_for_weight_conversion)
            if jax.process_index() == 0:
                write_adapter(adapter_dir(save_directory, name), config, tensors)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload adapter",
        revision: str | None = None,
        create_pr: bool = False,
        selected_adapters: list[str] | None = None,
    ):
        """Uploads the adapters, as :meth:`save_pretrained` writes them, to the Hub repo ``repo_id``.

        The repo is created if missing (``private`` as given), and a README.md model card with PEFT's
        front matter (``library_name: peft``, ``base_model``) goes along. On several hosts every
        process must call this (saving gathers the adapters) and process 0 uploads.

        Args:
          repo_id: ``"org/name"``.
          private: make a new repo private (``None``: the Hub's default).
          token: a Hub token with write access (default: the login token).
          commit_message: the commit's message.
          revision: the branch to commit to (created from ``main`` if missing).
          create_pr: open a pull request instead of committing.
          selected_adapters: as in :meth:`save_pretrained` (default: all).

        Returns:
          The ``huggingface_hub.CommitInfo`` of the commit (``None`` on processes other than 0).

        >>> peft_model.push_to_hub("me/llama-lora", private=True)  # doctest: +SKIP
        """
        import tempfile

        from peftjax.io._hub import model_card, upload

        with tempfile.TemporaryDirectory(prefix="peftjax-push-") as folder:
            self.save_pretrained(folder, selected_adapters=selected_adapters)
            if jax.process_index() != 0:
                return None
            configs = [self.peft_config[n] for n in selected_adapters or self.peft_config]
            base = self._config_for_saving(configs[0]).base_model_name_or_path
            tags = ["peftjax", *sorted({str(c.peft_type).lower() for c in configs})]
            Path(folder, "README.md").write_text(model_card(base, tags=tags))
            return upload(folder, repo_id, private=private, token=token, commit_message=commit_message,
                          revision=revision, create_pr=create_pr)

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
        strict: bool = True,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> PeftModel:
        """Loads a saved adapter (HF PEFT's or peftjax's) onto ``model``.

        Args:
          model: the base NNX model (modified in place).
          model_id: the adapter directory (``adapter_config.json`` + weights), or a Hub repo id
            (``"org/adapter"``) fetched into the Hub cache (``HF_HUB_OFFLINE=1`` reads only the cache).
          adapter_name: the name to give the adapter.
          is_trainable: keep the adapter trainable (otherwise it is frozen for inference).
          config: use this config instead of the directory's.
          key_mapping: module-name mapping for user models (see ``peftjax.io``); default: a model
            read from a vision-language checkpoint maps to that class's names.
          allow_pickle: allow reading ``adapter_model.bin`` (pickle) when no safetensors exists.
          strict: refuse a file whose keys fit the model only in part (some file keys match no
            layer, or some adapter weights are missing from the file). ``False`` loads the part
            that fits and warns. A file none of whose keys fit is refused either way.
          revision: the branch, tag or commit of a Hub repo (default ``"main"``).
          subfolder: the adapter's folder inside the directory or repo.
          token: a Hub token for private or gated repos (default: the login token).
          cache_dir: the Hub cache to use instead of ``HF_HUB_CACHE``.

        Raises:
          AdapterKeyError: the file's keys do not fit the model (names the file, the first keys
            that do not fit and the model's closest module names); the model is left unchanged.
          FileNotFoundError: no adapter there, or the Hub repo cannot be fetched (names the repo,
            the revision and why).

        >>> model = peftjax.models.from_pretrained("meta-llama/Llama-3.2-1B")  # doctest: +SKIP
        >>> peft_model = PeftModel.from_pretrained(model, "org/llama-lora", revision="v2")  # doctest: +SKIP
        """
        model_id = resolve(model_id, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                           kind="adapter", allow_pickle=allow_pickle)
        config = config or load_config(model_id)
        peft = cls.__new__(cls)
        if key_mapping is None:  # a model read from a vision-language checkpoint: that class's module names
            key_mapping = getattr(model, "adapter_key_mapping", None)
        peft.base_model, peft.peft_config, peft.key_mapping, peft.active_adapter = model, {}, key_mapping, adapter_name
        peft._active_adapters = [adapter_name]
        peft._disabled = False
        peft._load(model_id, adapter_name, config, is_trainable=is_trainable, allow_pickle=allow_pickle,
                   strict=strict)
        peft.set_adapter(adapter_name, inference_mode=not is_trainable)
        return peft

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        *,
        allow_pickle: bool = False,
        strict: bool = True,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> tuple[list[str], list[str]]:
        """Loads another saved adapter under ``adapter_name`` (not activated); returns (missing, unexpected).

        ``model_id`` is a directory or a Hub repo id; ``strict``, ``revision``, ``subfolder``,
        ``token`` and ``cache_dir`` as in :meth:`from_pretrained`.
        """
        model_id = resolve(model_id, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                           kind="adapter", allow_pickle=allow_pickle)
        return self._load(model_id, adapter_name, load_config(model_id), is_trainable=is_trainable,
                          allow_pickle=allow_pickle, strict=strict)

    def _load(self, model_id, adapter_name, config, *, is_trainable, allow_pickle, strict):
        tuner_for(config)  # an unsupported method fails before anything is read
        # read and check the files before touching the model
        tensors = read_adapter_weights(model_id, allow_pickle=allow_pickle)
        fuse = getattr(self.base_model, "fused_adapter_tensors", None)  # MoE: transformers 4's per-expert LoRA
        if fuse is not None and getattr(config, "peft_type", None) == "LORA":
            tensors = fuse(tensors, source=str(model_id))
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        config = _saved_by_suffix(self.base_model, config, tensors)
        if getattr(config, "init_lora_weights", None) == "loftq" and _quantized(self.base_model):
            # LoftQ's workflow: its rewritten base was saved and loaded in 4 or 8 bits; that base
            # already is the quantization LoftQ would compute, and the file holds the factors
            config = dataclasses.replace(config, init_lora_weights=True, loftq_config={})
        with tuner_base.adapter_from_file():
            self.add_adapter(adapter_name, config)
        source = str(Path(model_id))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                missing, unexpected = set_peft_model_state_dict(self, tensors, adapter_name, source=source)
            _check_keys(self.base_model, source, tensors, missing, unexpected, strict=strict)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        refresh_arrow(self)  # a new expert for an Arrow router: its GenKnowSub and the prototypes
        if missing:
            warnings.warn(f"{source}: found missing adapter keys while loading the checkpoint (strict=False): "
                          f"{missing[:10]}", stacklevel=3)
        return missing, unexpected


_ADAPTER_SEGMENTS = ("base_layer", "modules_to_save", "lora_", "ia3_", "hada_", "lokr_", "adapter_")


def _saved_by_suffix(model, config, tensors) -> PeftConfig:
    """``config`` naming in full the modules an older PEFT's suffix match saved in the file (its
    ``["norm"]`` took every ``input_layernorm``), so that they load as they were trained."""
    if not getattr(config, "modules_to_save", None):
        return config
    from peftjax.config import with_suffix_matched_modules_to_save
    from peftjax.io._adapter import PREFIX

    held = set()
    for key in tensors:
        parts = key.removeprefix(PREFIX).split(".")[:-1]
        if not any(p.startswith(_ADAPTER_SEGMENTS) for p in parts):
            held.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_suffix_matched_modules_to_save(config, tuner_base.named_modules(model), held)


def _quantized(model) -> bool:
    from peftjax.quantization import QuantizedLinear

    return any(isinstance(m, QuantizedLinear) for _, m in iter_modules(model))


def _check_keys(model, source: str, tensors, missing: list[str], unexpected: list[str], *, strict: bool) -> None:
    """Refuses a file none of whose keys fit the model, and (``strict``) any that fits only in part."""
    if not tensors:
        raise AdapterKeyError(f"{source}: the adapter file holds no tensors")
    per_expert = [k for k in unexpected if re.search(r"\.experts\.\d+\.", k)]
    if per_expert:  # PEFT fuses these on load (convert_peft_adapter_state_dict_for_transformers)
        raise NotImplementedError(
            f"{source}: an adapter on a mixture of experts saved in transformers 4's per-expert layout "
            f"({per_expert[:2]}); peftjax fuses only LoRA's lora_A/lora_B (as PEFT 0.22.0 does)")
    if len(unexpected) == len(tensors):
        raise AdapterKeyError(
            f"{source}: none of the adapter's {len(tensors)} keys matches this {type(model).__name__}; "
            f"first keys in the file: {sorted(tensors)[:3]}; {_closest(model, unexpected[0])}"
        )
    if strict and (unexpected or missing):
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} keys in the file match nothing in the model ({unexpected[:3]}; "
                         f"{_closest(model, unexpected[0])})")
        if missing:
            parts.append(f"{len(missing)} adapter weights of the model are not in the file ({missing[:3]})")
        raise AdapterKeyError(
            f"{source}: the adapter does not fit this {type(model).__name__}: {'; '.join(parts)}. Was it trained "
            "on another model class or task (e.g. a classifier head on a bare encoder)? Pass strict=False to "
            "load the matching part anyway"
        )


def _closest(model, key: str) -> str:
    """``the model's closest module names: [...]`` for a PEFT file key."""
    import difflib

    from peftjax.io._adapter import PREFIX
    from peftjax.tuners.base import named_modules

    wanted = key.removeprefix(PREFIX)
    names = [n for n in named_modules(model) if n and not any(p.startswith(_ADAPTER_SEGMENTS) for p in n.split("."))]
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.3)
    return f"the model's closest module names: {close or names[:3]}"


def _leaf_paths(tree) -> set[str]:
    return {jax.tree_util.keystr(path, simple=True, separator=".")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _deleted_paths(state) -> list[str]:
    """Paths of the arrays in ``state`` whose buffers were donated (deleted)."""
    out = []
    for path, value in nnx.to_flat_state(state):
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer) and value.is_deleted():
            out.append(".".join(map(str, path)))
    return out


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
      key_mapping: maps the model's module paths to HF names in saved files (user models);
        default: a model read from a vision-language checkpoint (the Hub's Gemma 3, Gemma 4,
        Qwen3.5) gets that class's names (``model.language_model.*``), as PEFT gives them there.

    >>> peft_model = get_peft_model(model, LoraConfig(r=8, task_type="CAUSAL_LM"))  # doctest: +SKIP
    >>> peft_model.print_trainable_parameters()  # doctest: +SKIP
    trainable params: 3,584 || all params: 110,400 || trainable%: 3.2464

    For a task with a head (``SEQ_CLS``, ``TOKEN_CLS``, ``QUESTION_ANS``), the head's modules the
    checkpoint lacked (``model.newly_initialised``: DeBERTa's pooler) join ``modules_to_save``
    beside PEFT's ``classifier``/``score``, so the adapter file carries them (see
    ``peftjax.config.add_new_head_modules``); so do a multiple-choice model's (``...ForMultipleChoice``,
    whose adapters have no task type, as PEFT has none for it: its ``classifier``).
    """
    from peftjax.config import add_new_head_modules

    choices = type(model).__name__.endswith("ForMultipleChoice")
    peft_config = add_new_head_modules(peft_config, getattr(model, "newly_initialised", ()), head=choices)
    return PeftModel(model, peft_config, adapter_name, key=key, key_mapping=key_mapping)


class LoadResult(NamedTuple):
    """What :func:`set_peft_model_state_dict` did not match, as PEFT's (torch's) ``load_result``."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def get_peft_model_state_dict(
    model: PeftModel,
    state_dict: nnx.State | None = None,
    adapter_name: str = "default",
    *,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """An adapter's weights under PEFT's on-disk keys, for any method; PEFT's function.

    This is exactly what :meth:`PeftModel.save_pretrained` writes to ``adapter_model.safetensors``.

    Args:
      model: the ``PeftModel``.
      state_dict: the trainable state to read instead of the model's own weights (what
        ``peftjax.split(model.base_model)`` returns and a train step hands back); the model is
        not changed. ``None`` reads the model.
      adapter_name: which adapter.
      save_embedding_layers: also save targeted embedding layers' base weights; ``"auto"`` does
        when ``target_modules`` names one (``embed_tokens``, ``lm_head``), for every method. A
        resized vocabulary (``resize_token_embeddings``; ``"auto"``: resized in this process or
        unlike the base checkpoint's ``config.json``) saves the input and output embeddings whole,
        as PEFT does.

    Returns:
      ``{"base_model.model.<module>.<suffix>": array}`` in torch layouts, on the host.

    Raises:
      ValueError: no adapter ``adapter_name``, or ``state_dict`` is not the model's trainable tree.

    Example:
      >>> sd = peftjax.get_peft_model_state_dict(peft_model)  # doctest: +SKIP
      >>> sorted(sd)[0]  # doctest: +SKIP
      'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    base = model.base_model
    if state_dict is None:
        model._check_live("read the adapters")
    else:
        model._check_trainable(state_dict, "get_peft_model_state_dict(state_dict=...)")
        base = nnx.clone(base)
        nnx.update(base, state_dict)
    config = model._config_for_saving(model.peft_config[adapter_name])
    tensors = tuner_for(config).state_dict(
        base, adapter_name, config, key_mapping=model.key_mapping, save_embedding_layers=save_embedding_layers
    )
    tensors.update(vocabulary_state_dict(base, config, tensors, save_embedding_layers, model.key_mapping))
    return {k: _to_host(v) for k, v in tensors.items()}


def set_peft_model_state_dict(
    model: PeftModel,
    peft_model_state_dict: Mapping[str, Any],
    adapter_name: str = "default",
    *,
    source: str = "state dict",
) -> LoadResult:
    """Sets an existing adapter's weights from PEFT's on-disk keys, for any method; PEFT's function.

    Args:
      model: the ``PeftModel`` that already carries adapter ``adapter_name``.
      peft_model_state_dict: ``{PEFT key: array}`` (numpy, JAX or CPU torch tensors), as
        :func:`get_peft_model_state_dict` returns or ``adapter_model.safetensors`` holds.
      adapter_name: which adapter to fill.
      source: names the origin in error messages.

    Returns:
      ``(missing_keys, unexpected_keys)``: adapter weights the dict lacks (left as they were)
      and keys nothing in the model consumed (ignored, with a warning).

    Raises:
      ValueError: no adapter ``adapter_name``.
      AdapterFileError: a tensor is not a float tensor or has the wrong shape (names key and shapes).
    """
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(model.peft_config)}")
    tensors = {k: np.asarray(v) for k, v in peft_model_state_dict.items()}
    tensors = load_vocabulary_weights(model.base_model, tensors, source=source, key_mapping=model.key_mapping)
    missing, unexpected = tuner_for(model.peft_config[adapter_name]).load_state_dict(
        model.base_model, tensors, adapter_name, key_mapping=model.key_mapping, source=source
    )
    return LoadResult(missing, unexpected)
