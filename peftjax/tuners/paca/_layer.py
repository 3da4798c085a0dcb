"""PaCA for Flax NNX: ``r`` input columns of each targeted weight trained in place.

As in HF PEFT 0.22 (``peft/tuners/paca/layer.py``), a targeted ``nnx.Linear`` computes

    y = x (W + s delta_W)^T + bias,   delta_W[:, idx] = paca_delta,   s = paca_alpha / r

``idx`` (``paca_indices``, sorted, fixed when the adapter is made and saved with it) names the
columns; only ``paca_delta [out, len(idx)]`` trains. PEFT swaps the updated columns into the
weight around one matmul; here the update is its own small matmul on the selected inputs,
``x[..., idx] @ (s paca_delta)^T``, which is the same sum and keeps the frozen kernel untouched.

On disk (PEFT's keys): ``<path>.paca_delta`` ``[out, r]`` float32 and ``<path>.paca_indices``
``[r]`` int64.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass


class ColumnIndices(nnx.Variable):
    """An adapter's frozen input columns ``[r]`` (sorted), saved with it."""


@dataclasses.dataclass(frozen=True)
class PacaSpec:
    """Static settings of one PaCA adapter on one layer."""

    r: int  # the columns it trains
    scaling: float  # paca_alpha / the config's r


class PacaLayer(AdditiveLayer):
    """Mixin marking a PaCA layer (``isinstance(m, PacaLayer)`` finds them)."""

    method_name = "PaCA"
    status_module_type = "paca.Linear"
    weight_dicts = ("paca_delta",)
    cache_dicts = ("paca_indices",)
    reports_quantization_backend = True  # PEFT's status names bitsandbytes' backend for it

    def add_paca(self, name: str, spec: PacaSpec, delta, indices) -> None:
        self._check_new(name)
        self.paca_delta[name] = AdapterParam(jnp.asarray(delta, jnp.float32))
        self.paca_indices[name] = ColumnIndices(jnp.asarray(indices, jnp.int32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        int64 = lambda v: v.astype(np.int64) if isinstance(v, np.ndarray) else v  # noqa: E731  (PEFT's dtype)
        return {"paca_delta": (self.paca_delta, same, same), "paca_indices": (self.paca_indices, int64, same)}

    def _describe(self, name: str) -> str:
        return f"PaCA r={self.spec(name).r}"

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight`` (scaled), in the kernel's ``[in, out]`` layout."""
        n_in, n_out = self.kernel.get_value().shape
        update = self.paca_delta[name].get_value().astype(jnp.float32).T * self.spec(name).scaling
        return jnp.zeros((n_in, n_out), jnp.float32).at[self.paca_indices[name].get_value()].add(update)

    def __call__(self, x, *args, **kwargs):
        def update(name, spec):
            columns = jnp.take(x, self.paca_indices[name].get_value(), axis=-1).astype(jnp.float32)
            return columns @ (self.paca_delta[name].get_value().astype(jnp.float32).T * spec.scaling)

        return self._plus_updates(x, args, kwargs, update)


def paca_class_for(module) -> type:
    if isinstance(module, PacaLayer):
        return type(module)
    return mixin_subclass(type(module), PacaLayer, "PaCA")
