"""SHiRA for Flax NNX: a sparse update at fixed positions of each targeted weight.

As in HF PEFT 0.22.0 (``peft/tuners/shira/layer.py``), a targeted ``nnx.Linear`` computes

    y = x (W + delta_W)^T + bias,   delta_W[rows, cols] = shira_weight

with ``delta_W [out, in]`` zero but at the ``n = r (in + out)`` positions ``shira_indices [2, n]``
(row, column), fixed when the adapter is made and saved with it; only ``shira_weight [n]`` trains.
The update is scattered into a dense matrix each call, as PEFT forms the new weight each call: one
extra matmul, which accelerators run faster than a gather of ``n`` columns per token.

On disk (PEFT's keys): ``<path>.shira_weight`` ``[n]`` float32 and ``<path>.shira_indices``
``[2, n]`` int32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass


class SparseIndices(nnx.Variable):
    """An adapter's frozen positions ``[2, n]`` (row, column of the ``[out, in]`` weight), saved with it."""


@dataclasses.dataclass(frozen=True)
class ShiraSpec:
    """Static settings of one SHiRA adapter on one layer."""

    r: int


def sparse_delta(values: jax.Array, indices: jax.Array, n_in: int, n_out: int) -> jax.Array:
    """``delta_W`` in the kernel layout ``[in, out]``, float32: ``values`` at ``(column, row)`` of ``indices``."""
    return jnp.zeros((n_in, n_out), jnp.float32).at[indices[1], indices[0]].add(values.astype(jnp.float32))


class ShiraLayer(AdditiveLayer):
    """Mixin marking a SHiRA layer (``isinstance(m, ShiraLayer)`` finds them)."""

    method_name = "SHiRA"
    status_module_type = "shira.Linear"
    weight_dicts = ("shira_weight",)
    cache_dicts = ("shira_indices",)
    reports_quantization_backend = True  # PEFT's status names bitsandbytes' backend for it

    def add_shira(self, name: str, spec: ShiraSpec, values, indices) -> None:
        self._check_new(name)
        self.shira_weight[name] = AdapterParam(jnp.asarray(values, jnp.float32))
        self.shira_indices[name] = SparseIndices(jnp.asarray(indices, jnp.int32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"shira_weight": (self.shira_weight, same, same), "shira_indices": (self.shira_indices, same, same)}

    def _describe(self, name: str) -> str:
        return f"SHiRA r={self.spec(name).r}"

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight``, in the kernel's ``[in, out]`` layout."""
        n_in, n_out = self.kernel.get_value().shape
        return sparse_delta(self.shira_weight[name].get_value(), self.shira_indices[name].get_value(), n_in, n_out)

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, _: x.astype(jnp.float32) @ self.kernel_delta(name))


def shira_class_for(module) -> type:
    if isinstance(module, ShiraLayer):
        return type(module)
    return mixin_subclass(type(module), ShiraLayer, "SHiRA")
