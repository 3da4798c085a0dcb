"""TinyLoRA for Flax NNX: a frozen truncated SVD of the weight around a tiny trained middle.

As in HF PEFT 0.22.0 (``peft/tuners/tinylora/layer.py``), a targeted linear layer holds frozen
``tinylora_A [r, in]`` and ``tinylora_B [out, r]`` (the weight's truncated SVD, the singular values
split between them) and ``tinylora_P [u, r, r]`` (random), and reads the trained ``v [u]`` of its
group (one variable the group's layers share):

    R = sum_i v_i P_i,   y = base(x) + ((dropout(x) A^T) R^T) B^T

``merge`` adds ``B R A``. On disk (PEFT's keys): ``<path>.tinylora_A``, ``.tinylora_B``, with
``save_projection`` ``.tinylora_P``, and each group's ``base_model.tinylora_v.<group>``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass


class TinyLoraFrozen(nnx.Variable):
    """A layer's frozen SVD factors and projection tensors (PEFT's buffers)."""


@dataclasses.dataclass(frozen=True)
class TinyLoraSpec:
    """Static settings of one TinyLoRA adapter on one layer."""

    r: int
    group: str  # the key of the trained vector it reads
    dropout: float = 0.0
    save_projection: bool = True


class TinyLoraLayer(AdditiveLayer):
    """Mixin marking a TinyLoRA layer (``isinstance(m, TinyLoraLayer)`` finds them)."""

    method_name = "TinyLoRA"
    status_module_type = "tinylora.Linear"
    weight_dicts = ("tinylora_v",)  # the group's, shared
    cache_dicts = ("tinylora_A", "tinylora_B", "tinylora_P")

    def add_tinylora(self, name: str, spec: TinyLoraSpec, v: AdapterParam, a, b, p) -> None:
        self._check_new(name)
        self.tinylora_v[name] = v
        for attr, value in (("tinylora_A", a), ("tinylora_B", b), ("tinylora_P", p)):
            getattr(self, attr)[name] = TinyLoraFrozen(jnp.asarray(value, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        layout = {"tinylora_A": (self.tinylora_A, same, same), "tinylora_B": (self.tinylora_B, same, same)}
        if self.spec(name).save_projection:
            layout["tinylora_P"] = (self.tinylora_P, same, same)
        return layout

    def _describe(self, name: str) -> str:
        return f"TinyLoRA r={self.spec(name).r}, u={self.tinylora_v[name].get_value().shape[0]}"

    def _factors(self, name: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(A, R, B)`` of adapter ``name``, float32."""
        value = lambda d: d[name].get_value().astype(jnp.float32)  # noqa: E731
        r = jnp.einsum("i,ijk->jk", value(self.tinylora_v), value(self.tinylora_P))
        return value(self.tinylora_A), r, value(self.tinylora_B)

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight`` (``B R A``), in the kernel's ``[in, out]`` layout."""
        a, r, b = self._factors(name)
        return (b @ r @ a).T

    def _update(self, x: jax.Array, name: str, spec: TinyLoraSpec) -> jax.Array:
        a, r, b = self._factors(name)
        h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
        return ((h @ a.T) @ r.T) @ b.T

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


def tinylora_class_for(module) -> type:
    if isinstance(module, TinyLoraLayer):
        return type(module)
    return mixin_subclass(type(module), TinyLoraLayer, "TinyLora")
