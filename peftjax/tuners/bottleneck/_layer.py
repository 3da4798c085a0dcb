"""Bottleneck adapter layers: ``h + up(act(down(h)))`` on a linear layer's output (see the package docstring)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.tuners.base import AdapterDictLayer, AdapterParam
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._broadcast import along_last




def bottleneck_size(features: int, reduction_factor: float) -> int:
    """``m = max(1, d // reduction_factor)``, as adapter-transformers sizes it."""
    return max(1, int(features // reduction_factor))


@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
    """Static settings of one bottleneck adapter on one layer.

    Attributes:
      size: the bottleneck width ``m``.
      non_linearity: a key of ``ACTIVATIONS``.
      residual: output ``h + f(h)`` (else ``f(h)``).
    """

    size: int
    non_linearity: str
    residual: bool


def _same(x):
    return x


class BottleneckLayer(AdapterDictLayer):
    """Mixin marking a layer that carries bottleneck adapters on its output."""

    method_name = "bottleneck"
    weight_dicts = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")


class BottleneckLinear(BottleneckLayer):
    """Bottleneck adapters on the output of an ``nnx.Linear`` (GPT-2's ``Conv1D`` included).

    Kernels are Flax's ``[in, out]``: ``adapter_down`` is ``[d, m]``, ``adapter_up`` is ``[m, d]``.
    """

    def add_bottleneck(self, name: str, spec: BottleneckSpec, key: jax.Array) -> None:
        self._check_new(name)
        d = self.kernel.get_value().shape[1]
        self.adapter_down[name] = AdapterParam(0.02 * jax.random.normal(key, (d, spec.size), jnp.float32))
        self.adapter_down_bias[name] = AdapterParam(jnp.zeros((spec.size,), jnp.float32))
        self.adapter_up[name] = AdapterParam(jnp.zeros((spec.size, d), jnp.float32))
        self.adapter_up_bias[name] = AdapterParam(jnp.zeros((d,), jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        t = jnp.transpose
        return {
            "adapter_down.weight": (self.adapter_down, t, t),
            "adapter_down.bias": (self.adapter_down_bias, _same, _same),
            "adapter_up.weight": (self.adapter_up, t, t),
            "adapter_up.bias": (self.adapter_up_bias, _same, _same),
        }

    def _describe(self, name: str) -> str:
        return f"bottleneck size {self.spec(name).size}"

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        for name, spec in self._live_adapters():
            h = y.astype(jnp.float32)
            down = h @ self.adapter_down[name].get_value() + along_last(self.adapter_down_bias[name].get_value(), h.ndim)
            f = ACTIVATIONS[spec.non_linearity](down) @ self.adapter_up[name].get_value()
            f = f + along_last(self.adapter_up_bias[name].get_value(), f.ndim)
            y = (h + f if spec.residual else f).astype(y.dtype)
        return y

    def merge_adapter(self, name: str) -> None:
        raise NotImplementedError(
            f"{self.adapter_path}: bottleneck adapters are non-linear (up(act(down(h)))) and cannot be merged into "
            "the base weights; keep the adapter layers for inference, or use unload() to drop them"
        )

    def unmerge_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{self.adapter_path}: bottleneck adapters are never merged")
