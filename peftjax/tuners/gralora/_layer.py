"""GraLoRA for Flax NNX: a LoRA cut into ``k x k`` blocks, each with its own low-rank pair.

As in HF PEFT 0.22.0 (``peft/tuners/gralora/layer.py``), a targeted linear layer computes

    y = base(x) + s * G(dropout(x)) [+ s * (dropout(x) A_g) B_g]

with ``s = alpha / (r + hybrid_r)``. ``G`` cuts the input into ``k`` slices; slice ``n`` goes
through its ``A_n = gralora_A[n] [in/k, r]``, whose ``r`` ranks are dealt out ``r/k`` to each
output slice ``j``; slice ``j`` gathers the ``r/k`` ranks every input slice sent it (``r`` in all)
and maps them through ``B_j = gralora_B[j] [r, out/k]``. So block ``(n, j)`` of the update is a
rank-``r/k`` product and the whole update has rank up to ``k r`` at a rank-``r`` LoRA's size. The
optional hybrid part is a plain LoRA of rank ``hybrid_r``.

On disk (PEFT's keys): ``<path>.gralora_A`` ``[k, in/k, r]``, ``.gralora_B`` ``[k, r, out/k]``, and
with ``hybrid_r > 0`` ``.gralora_A_general.weight`` ``[hybrid_r, in]`` and
``.gralora_B_general.weight`` ``[out, hybrid_r]`` (torch ``Linear`` layouts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass


@dataclasses.dataclass(frozen=True)
class GraloraSpec:
    """Static settings of one GraLoRA adapter on one layer."""

    r: int
    k: int
    hybrid_r: int
    scaling: float
    dropout: float = 0.0


def granular(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``G(x)``: ``x [..., in]`` through the blocks of ``a [k, in/k, r]`` and ``b [k, r, out/k]``."""
    k, _, r = a.shape
    lead = x.shape[:-1]
    h = jnp.einsum("...ni,nir->...nr", x.reshape(*lead, k, -1), a)  # [..., k (n), r]
    h = h.reshape(*lead, k, k, r // k)  # ranks of input slice n dealt out to output slices j
    h = jnp.swapaxes(h, -3, -2).reshape(*lead, k, r)  # output slice j gathers its r/k from each n
    return jnp.einsum("...jr,jro->...jo", h, b).reshape(*lead, -1)


def granular_delta(a: jax.Array, b: jax.Array) -> jax.Array:
    """``G``'s matrix in the kernel layout, ``[in, out]``: block ``(n, j)`` is ``A_n[:, j's ranks] B_j[n's ranks]``."""
    k, n_in, r = a.shape
    a4 = a.reshape(k, n_in, k, r // k)  # [n, i, j, s]
    b4 = b.reshape(k, k, r // k, -1)  # [j, n, s, o]
    return jnp.einsum("nijs,jnso->nijo", a4, b4).reshape(k * n_in, -1)


class GraloraLayer(AdditiveLayer):
    """Mixin marking a GraLoRA layer (``isinstance(m, GraloraLayer)`` finds them)."""

    method_name = "GraLoRA"
    status_module_type = "gralora.Linear"
    weight_dicts = ("gralora_A", "gralora_B", "gralora_A_general", "gralora_B_general")

    def add_gralora(self, name: str, spec: GraloraSpec, a, b, a_general=None, b_general=None) -> None:
        self._check_new(name)
        self.gralora_A[name] = AdapterParam(jnp.asarray(a, jnp.float32))
        self.gralora_B[name] = AdapterParam(jnp.asarray(b, jnp.float32))
        if spec.hybrid_r:
            self.gralora_A_general[name] = AdapterParam(jnp.asarray(a_general, jnp.float32))
            self.gralora_B_general[name] = AdapterParam(jnp.asarray(b_general, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        flip = lambda v: v.T  # noqa: E731  (kernel [in, out] <-> torch Linear weight [out, in])
        return {"gralora_A": (self.gralora_A, same, same), "gralora_B": (self.gralora_B, same, same),
                "gralora_A_general.weight": (self.gralora_A_general, flip, flip),
                "gralora_B_general.weight": (self.gralora_B_general, flip, flip)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"GraLoRA r={spec.r} gralora_k={spec.k} hybrid_r={spec.hybrid_r}"

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight``, in the kernel's ``[in, out]`` layout."""
        spec = self.spec(name)
        delta = granular_delta(self.gralora_A[name].get_value(), self.gralora_B[name].get_value())
        if spec.hybrid_r:
            delta = delta + self.gralora_A_general[name].get_value() @ self.gralora_B_general[name].get_value()
        return delta * spec.scaling

    def _update(self, x: jax.Array, name: str, spec: GraloraSpec) -> jax.Array:
        h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
        update = granular(h, self.gralora_A[name].get_value(), self.gralora_B[name].get_value())
        if spec.hybrid_r:
            update = update + (h @ self.gralora_A_general[name].get_value()) @ self.gralora_B_general[name].get_value()
        return spec.scaling * update

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


def gralora_class_for(module) -> type:
    if isinstance(module, GraloraLayer):
        return type(module)
    return mixin_subclass(type(module), GraloraLayer, "GraLoRA")
