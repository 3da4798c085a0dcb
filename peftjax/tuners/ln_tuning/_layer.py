"""LN tuning for Flax NNX: a trained copy of each targeted normalization layer, per adapter.

A targeted ``nnx.LayerNorm`` / ``nnx.RMSNorm`` keeps its ``scale`` (and ``bias``) and gains, per
adapter name, a trainable copy of each (``ln_tuning_scale``, ``ln_tuning_bias``), as PEFT's
``LNTuningLayer`` keeps a deep copy of the layer (``peft/tuners/ln_tuning/layer.py``). While the
adapter is active the layer runs with the copy's weights; with several active adapters it
refuses, as PEFT does. ``merge`` swaps the copy's weights into the layer and the layer's into the
adapter slot (PEFT swaps the modules), so merged and unmerged forwards agree and ``unmerge``
swaps back exactly.

On disk (PEFT's keys): ``base_model.model.<path>.ln_tuning_layers.weight`` (and ``.bias``).
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
from flax import nnx

from peftjax.models._modeling import hf_param_map
from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass

# the norm's attribute -> this layer's per-adapter copy
_COPIES = {"scale": "ln_tuning_scale", "bias": "ln_tuning_bias"}


def _same(x):
    return x


class LNTuningLayer(AdapterDictLayer):
    """Mixin marking an LN-tuning layer (``isinstance(m, LNTuningLayer)`` finds them)."""

    method_name = "LN tuning"
    status_module_type = "ln_tuning.LNTuningLayer"  # PEFT's layer class, whatever the norm
    weight_dicts = tuple(_COPIES.values())


class LNTuningNorm(LNTuningLayer):
    """LN tuning on ``nnx.LayerNorm`` and ``nnx.RMSNorm``."""

    def _own_params(self) -> list[str]:
        return [attr for attr in _COPIES if isinstance(getattr(self, attr, None), nnx.Param)]

    def add_ln_tuning(self, name: str) -> None:
        self._check_new(name)
        for attr in self._own_params():
            # a real copy: the train step donates trainable buffers, which must not be the frozen original's
            getattr(self, _COPIES[attr])[name] = AdapterParam(jnp.array(getattr(self, attr).get_value(), copy=True))
        self._add_spec(name, None)

    def peft_layout(self, name: str):
        torch_names = {attr: torch_name for attr, (torch_name, _) in hf_param_map(self).items()}
        return {f"ln_tuning_layers.{torch_names[attr]}": (getattr(self, _COPIES[attr]), _same, _same)
                for attr in self._own_params()}

    def __call__(self, x, *args, **kwargs):
        live = self._live_adapters()
        if not live:
            return self._peftjax_base.__call__(self, x, *args, **kwargs)
        if len(live) > 1:
            raise ValueError(
                f"Trying to run forward with {len(live)} active adapters, but LN tuning does not allow inference "
                "with more than one adapter at a time"
            )
        name = live[0][0]
        originals = {attr: getattr(self, attr) for attr in self._own_params()}
        try:  # the layer's own math, with the adapter's weights in place of its own
            for attr in originals:
                setattr(self, attr, getattr(self, _COPIES[attr])[name])
            return self._peftjax_base.__call__(self, x, *args, **kwargs)
        finally:
            for attr, var in originals.items():
                setattr(self, attr, var)

    def _swap(self, name: str) -> None:
        for attr in self._own_params():
            base, copy = getattr(self, attr), getattr(self, _COPIES[attr])[name]
            b, c = base.get_value(), copy.get_value()
            base.set_value(c.astype(b.dtype))
            copy.set_value(b.astype(c.dtype))

    def merge_adapter(self, name: str) -> None:
        """Swaps the adapter's weights into the layer (one merged adapter at a time, as in PEFT)."""
        if self.adapter_merged:
            warnings.warn(f"Already merged with {set(self.adapter_merged)}. Unmerging first.", stacklevel=2)
            self.unmerge_adapter(self.adapter_merged[-1])
        self._swap(name)
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._swap(name)
        self._mark_merged(name, False)


def ln_tuning_class_for(module: nnx.Module) -> type | None:
    if isinstance(module, LNTuningLayer):
        return type(module)
    if isinstance(module, nnx.LayerNorm | nnx.RMSNorm):
        return mixin_subclass(type(module), LNTuningNorm, "LNTuning")
    return None
