"""Super-Tuning for Flax NNX: trained values at the frozen weight's largest-magnitude positions.

As in HF PEFT 0.22.0 (``peft/tuners/supertuning/layer.py``), a targeted ``nnx.Linear`` computes

    y = x (W + S)^T + bias (+ dropout(x) A^T B^T * lora_alpha / r, "Supra")

with ``S [out, in]`` zero but at the flat positions ``supertuning_indices [n]`` (of the row-major
``[out, in]`` weight, chosen by :func:`magnitude_support` when the adapter is made), where it holds
the trained ``supertuning_values [n]``. ``merge`` adds ``S`` (and the LoRA's product), ``unmerge``
subtracts them.

On disk (PEFT's keys): ``<path>.supertuning_values`` float32, ``<path>.supertuning_indices`` int32
(unless ``save_precomputed_indices=False``), ``<path>.supertuning_lora_A.weight [r, in]`` and
``.supertuning_lora_B.weight [out, r]`` with ``r``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass


class SupportIndices(nnx.Variable):
    """An adapter's frozen flat positions ``[n]`` in the ``[out, in]`` weight."""


@dataclasses.dataclass(frozen=True)
class SupertuningSpec:
    """Static settings of one Super-Tuning adapter on one layer (``r = 0``: no LoRA)."""

    r: int = 0
    scaling: float = 0.0
    dropout: float = 0.0
    save_indices: bool = True


def magnitude_support(kernel: jax.Array, sparsity: float, select_top: bool) -> jax.Array:
    """PEFT's positions: the ``int(in * out * (1 - sparsity))`` entries of the ``[out, in]`` weight
    with the largest (or smallest) ``|W|``, as flat row-major indices in that order (``int32``).

    Raises:
      ValueError: the sparsity leaves no entry (PEFT's message).
    """
    scores = jnp.abs(kernel.astype(jnp.float32)).T.reshape(-1)  # torch's [out, in], flattened
    k = int(scores.size * (1 - sparsity))
    if k < 1:
        raise ValueError(f"sparsity={sparsity} leaves no trainable entries for a weight with {scores.size} "
                         "elements — no parameter would be adapted. Lower the sparsity so at least one entry is "
                         "trainable.")
    _, indices = jax.lax.top_k(scores if select_top else -scores, k)
    return indices.astype(jnp.int32)


class SupertuningLayer(AdditiveLayer):
    """Mixin marking a Super-Tuning layer (``isinstance(m, SupertuningLayer)`` finds them)."""

    method_name = "Super-Tuning"
    status_module_type = "Linear"  # PEFT's layer keeps torch's repr
    weight_dicts = ("supertuning_values", "supertuning_lora_A", "supertuning_lora_B")
    cache_dicts = ("supertuning_indices",)

    def add_supertuning(self, name: str, spec: SupertuningSpec, values, indices, a=None, b=None) -> None:
        self._check_new(name)
        self.supertuning_values[name] = AdapterParam(jnp.asarray(values, jnp.float32))
        self.supertuning_indices[name] = SupportIndices(jnp.asarray(indices, jnp.int32))
        if spec.r:
            self.supertuning_lora_A[name] = AdapterParam(jnp.asarray(a, jnp.float32))
            self.supertuning_lora_B[name] = AdapterParam(jnp.asarray(b, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        layout = {"supertuning_values": (self.supertuning_values, same, same)}
        if self.spec(name).save_indices:
            layout["supertuning_indices"] = (self.supertuning_indices, same, same)
        layout.update({"supertuning_lora_A.weight": (self.supertuning_lora_A, same, same),
                       "supertuning_lora_B.weight": (self.supertuning_lora_B, same, same)})
        return layout

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"Super-Tuning, {self.supertuning_values[name].get_value().shape[0]} entries" + (
            f", Supra r={spec.r}" if spec.r else "")

    def sparse_delta(self, name: str) -> jax.Array:
        """``S`` in the kernel's ``[in, out]`` layout, float32."""
        n_in, n_out = self.kernel.get_value().shape
        flat = jnp.zeros((n_out * n_in,), jnp.float32).at[self.supertuning_indices[name].get_value()].add(
            self.supertuning_values[name].get_value().astype(jnp.float32))
        return flat.reshape(n_out, n_in).T

    def _lora(self, name: str) -> tuple[jax.Array, jax.Array]:
        return (self.supertuning_lora_A[name].get_value().astype(jnp.float32),
                self.supertuning_lora_B[name].get_value().astype(jnp.float32))

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight`` (``S`` plus the Supra LoRA's ``B A lora_alpha / r``), as ``[in, out]``."""
        spec = self.spec(name)
        delta = self.sparse_delta(name)
        if spec.r:
            a, b = self._lora(name)
            delta = delta + spec.scaling * (a.T @ b.T)
        return delta

    def _update(self, x: jax.Array, name: str, spec: SupertuningSpec) -> jax.Array:
        out = x.astype(jnp.float32) @ self.sparse_delta(name)
        if spec.r:
            a, b = self._lora(name)
            h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
            out = out + spec.scaling * ((h @ a.T) @ b.T)
        return out

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


def supertuning_class_for(module) -> type:
    if isinstance(module, SupertuningLayer):
        return type(module)
    return mixin_subclass(type(module), SupertuningLayer, "Supertuning")
