"""HRA for Flax NNX: a chain of Householder reflections on a layer's input features.

As in HF PEFT 0.22.0 (``peft/tuners/hra/layer.py``), a targeted ``nnx.Linear`` with torch weight
``W [out, in]`` computes ``x (W H)^T + b``, where the trained ``hra_u [in, r]`` gives

    H = (I - 2 u_0 u_0^T) (I - 2 u_1 u_1^T) ... (I - 2 u_{r-1} u_{r-1}^T),  u_i = hra_u[:, i] / |hra_u[:, i]|

or, with ``apply_GS``, ``H = I - 2 Q Q^T`` for ``Q`` the (modified) Gram-Schmidt orthonormal
columns of ``hra_u``. PEFT 0.22 applies ``H^T`` to the input too, in the compact WY form (0.21.2
formed ``H`` and the new weight at every call); here the forward reflects the input,
``x H^T = x R_{r-1} ... R_0`` with ``x R = x - 2 (x u) u^T``:
``O(r * in)`` per token, no ``[in, in]`` matrix. Several active adapters multiply in order
(``W H_1 H_2``), so the input meets the last adapter's reflections first.

``merge`` folds ``H`` into the weight (``kernel <- H^T kernel``, ``[in, out]`` here); ``unmerge``
applies the inverse, ``H`` (orthogonal), as PEFT's ``reverse`` product does.

On disk (PEFT's key): ``base_model.model.<path>.hra_u`` ``[in, r]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass


@dataclasses.dataclass(frozen=True)
class HRASpec:
    """Static settings of one HRA adapter on one layer.

    Attributes:
      r: the number of reflections.
      apply_GS: Gram-Schmidt orthonormal reflections (``H = I - 2 Q Q^T``).
    """

    r: int
    apply_GS: bool = False  # noqa: N815 - PEFT's name


def gram_schmidt(u: jax.Array) -> jax.Array:
    """The orthonormal columns ``Q [n, r]`` of ``u [n, r]`` by modified Gram-Schmidt, in PEFT's order:
    each column has the earlier finished ones projected out one at a time, then is normalised."""
    n, r = u.shape

    def column(q, i):
        def project(v, j):  # q's columns from i on are still zero: no-ops
            qj = q[:, j]
            return v - jnp.dot(qj, v) * qj, None

        v, _ = jax.lax.scan(project, u[:, i], jnp.arange(r))
        return q.at[:, i].set(v / jnp.linalg.norm(v)), None

    q, _ = jax.lax.scan(column, jnp.zeros_like(u), jnp.arange(r))
    return q


def reflect(x: jax.Array, u: jax.Array, spec: HRASpec) -> jax.Array:
    """``x H^T`` for the ``H`` of ``u [in, r]`` (float32 math; ``x [..., in]``)."""
    u = u.astype(jnp.float32)
    if spec.apply_GS:
        q = gram_schmidt(u)
        return x - 2.0 * (x @ q) @ q.T
    units = (u / jnp.linalg.norm(u, axis=0, keepdims=True)).T  # [r, in]
    lead = (1,) * (x.ndim - 1)

    def step(v, ui):
        return v - 2.0 * (v @ ui)[..., None] * ui.reshape(lead + ui.shape), None

    out, _ = jax.lax.scan(step, x, units[::-1])  # R_{r-1} first, R_0 last
    return out


class HRALayer(AdapterDictLayer):
    """Mixin marking an HRA layer (``isinstance(m, HRALayer)`` finds them)."""

    method_name = "HRA"
    status_module_type = "hra.HRALinear"
    weight_dicts = ("hra_u",)

    def add_hra(self, name: str, spec: HRASpec, value: jax.Array) -> None:
        self._check_new(name)
        self.hra_u[name] = AdapterParam(jnp.asarray(value, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        return {"hra_u": (self.hra_u, lambda v: v, lambda v: v)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"HRA r={spec.r}, apply_GS={spec.apply_GS}"

    def reflection_matrix(self, name: str) -> jax.Array:
        """``H^T`` (``[in, in]``) of adapter ``name``: what multiplies the input (PEFT's
        ``get_delta_weight`` is ``H``)."""
        n = self.kernel.get_value().shape[0]
        return reflect(jnp.eye(n, dtype=jnp.float32), self.hra_u[name].get_value(), self.spec(name))

    def __call__(self, x, *args, **kwargs):
        live = self._live_adapters()
        if live:
            v = x.astype(jnp.float32)
            for name, spec in reversed(live):  # W H_1 H_2: x meets H_2^T first
                v = reflect(v, self.hra_u[name].get_value(), spec)
            x = v.astype(x.dtype)
        return self._peftjax_base.__call__(self, x, *args, **kwargs)

    def merge_adapter(self, name: str) -> None:
        self._fold(self.reflection_matrix(name))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._fold(self.reflection_matrix(name).T)
        self._mark_merged(name, False)

    def _fold(self, mat: jax.Array) -> None:
        w = self.kernel.get_value()  # [in, out]: x H^T W^T = x (H^T kernel)
        self.kernel.set_value((mat @ w.astype(jnp.float32)).astype(w.dtype))


def hra_class_for(module) -> type:
    if isinstance(module, HRALayer):
        return type(module)
    return mixin_subclass(type(module), HRALayer, "HRA")
