"""DeLoRA for Flax NNX: a low-rank update whose norm is bounded by a trained ``lambda``.

As in HF PEFT 0.22.0 (``peft/tuners/delora/layer.py``), a targeted ``nnx.Linear`` computes

    y = base(x) + ((dropout(x) * w_norm) A^T * lambda / (r |a_i| |b_i|)) B^T

with the trained ``delora_A [r, in]``, ``delora_B [out, r]`` and ``delora_lambda [1]``, the row
norms ``|a_i|`` of ``A`` and column norms ``|b_i|`` of ``B`` (each at least ``1e-4``), and
``delora_w_norm [in]`` the base weight's column norms, fixed when the adapter is made and saved
with it. ``merge`` adds ``delta_W = B diag(...) A * w_norm`` to the kernel; ``unmerge`` subtracts it.

On disk (PEFT's keys): ``<path>.delora_A``, ``.delora_B``, ``.delora_lambda`` and ``.delora_w_norm``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass


class WeightNorm(nnx.Variable):
    """A layer's frozen base-weight column norms ``[in]``, saved with the adapter (PEFT's buffer)."""


@dataclasses.dataclass(frozen=True)
class DeloraSpec:
    """Static settings of one DeLoRA adapter on one layer."""

    r: int
    dropout: float = 0.0


def _clamped_norm(x: jax.Array, axis: int, floor: float = 1e-4) -> jax.Array:
    """``max(|x|, floor)`` along ``axis`` with torch's gradient: zero where the floor holds. (The
    gradient of ``jnp.linalg.norm`` at a zero vector is 0/0: ``B``'s default start, all zeros,
    would train to NaN at the first step.)"""
    squared = jnp.sum(x * x, axis=axis)
    above = squared > floor * floor
    return jnp.where(above, jnp.sqrt(jnp.where(above, squared, 1.0)), floor)


def delora_scaling(a: jax.Array, b: jax.Array, lam: jax.Array, r: int) -> jax.Array:
    """``lambda / (r |a_i| |b_i|)`` (``[r]``), the norms clamped at ``1e-4`` as PEFT clamps them."""
    return lam / r / (_clamped_norm(a, axis=1) * _clamped_norm(b, axis=0))


class DeloraLayer(AdditiveLayer):
    """Mixin marking a DeLoRA layer (``isinstance(m, DeloraLayer)`` finds them)."""

    method_name = "DeLoRA"
    status_module_type = "delora.DeloraLinear"
    weight_dicts = ("delora_A", "delora_B", "delora_lambda")
    cache_dicts = ("delora_w_norm",)

    def add_delora(self, name: str, spec: DeloraSpec, a, b, lam: float, w_norm) -> None:
        self._check_new(name)
        self.delora_A[name] = AdapterParam(jnp.asarray(a, jnp.float32))
        self.delora_B[name] = AdapterParam(jnp.asarray(b, jnp.float32))
        self.delora_lambda[name] = AdapterParam(jnp.full((1,), lam, jnp.float32))
        self.delora_w_norm[name] = WeightNorm(jnp.asarray(w_norm, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"delora_A": (self.delora_A, same, same), "delora_B": (self.delora_B, same, same),
                "delora_lambda": (self.delora_lambda, same, same),
                "delora_w_norm": (self.delora_w_norm, same, same)}

    def _describe(self, name: str) -> str:
        return f"DeLoRA r={self.spec(name).r}"

    def _weights(self, name: str):
        return (self.delora_A[name].get_value(), self.delora_B[name].get_value(),
                self.delora_lambda[name].get_value(), self.delora_w_norm[name].get_value())

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight`` (``[out, in]``), transposed to the kernel's ``[in, out]``."""
        a, b, lam, w_norm = (v.astype(jnp.float32) for v in self._weights(name))
        scale = delora_scaling(a, b, lam, self.spec(name).r)
        return ((b * scale[None, :]) @ a * w_norm[None, :]).T

    def _update(self, x: jax.Array, name: str, spec: DeloraSpec) -> jax.Array:
        a, b, lam, w_norm = (v.astype(jnp.float32) for v in self._weights(name))
        h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
        h = (along_last(w_norm, h.ndim) * h) @ a.T
        return (along_last(delora_scaling(a, b, lam, spec.r), h.ndim) * h) @ b.T

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


def delora_class_for(module) -> type:
    if isinstance(module, DeloraLayer):
        return type(module)
    return mixin_subclass(type(module), DeloraLayer, "DeLoRA")
