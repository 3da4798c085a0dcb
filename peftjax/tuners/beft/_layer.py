"""BEFT for Flax NNX: a trained bias added to a layer's output.

As in HF PEFT 0.22.0 (``peft/tuners/beft/layer.py``), a targeted ``nnx.Linear`` computes
``y = base(x) + b'`` with ``beft_bias [1, out]`` (active adapters' biases summed). ``merge`` adds
``b'`` to the layer's bias and ``unmerge`` subtracts it; a layer without a bias cannot merge
(PEFT's error, naming the adapter and here the layer too).

On disk (PEFT's key): ``<path>.beft_bias``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.nn._broadcast import along_last
from peftjax.tuners.base import AdapterDictLayer, AdapterParam, layer_bias, mixin_subclass


@dataclasses.dataclass(frozen=True)
class BeftSpec:
    """Static settings of one BEFT adapter on one layer (none: the bias is all)."""


class BeftLayer(AdapterDictLayer):
    """Mixin marking a BEFT layer (``isinstance(m, BeftLayer)`` finds them)."""

    method_name = "BEFT"
    status_module_type = "Linear"  # PEFT's BEFT layer keeps torch's repr
    weight_dicts = ("beft_bias",)

    def add_beft(self, name: str, bias) -> None:
        self._check_new(name)
        self.beft_bias[name] = AdapterParam(jnp.asarray(bias, jnp.float32))
        self._add_spec(name, BeftSpec())

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"beft_bias": (self.beft_bias, same, same)}

    def _describe(self, name: str) -> str:
        return "BEFT bias"

    def _bias(self, name: str) -> jax.Array:
        return self.beft_bias[name].get_value().astype(jnp.float32).reshape(-1)

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, _: along_last(self._bias(name), x.ndim))

    def _shift_bias(self, name: str, sign: float) -> None:
        bias = layer_bias(self)
        if bias is None:
            raise ValueError(f"{self.adapter_path}: Base layer has no bias, cannot merge bias adapter {name}")
        b = bias.get_value()
        bias.set_value((b.astype(jnp.float32) + sign * self._bias(name)).astype(b.dtype))

    def merge_adapter(self, name: str) -> None:
        self._shift_bias(name, 1.0)
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._shift_bias(name, -1.0)
        self._mark_merged(name, False)


def beft_class_for(module) -> type:
    if isinstance(module, BeftLayer):
        return type(module)
    return mixin_subclass(type(module), BeftLayer, "BEFT")
