"""OSF for Flax NNX: the trailing singular subspace of a linear layer's weight, trained orthogonally.

As in HF PEFT 0.22.0 (``peft/tuners/osf/layer.py``), a targeted layer's weight ``W [out, in]`` is
split by its SVD when the adapter is made: the ``k`` leading directions (``U_high``, ``V_high``)
stay frozen; the rest start the trained ``U_low [out, m]``, ``S_low [m]``, ``V_low [m, in]``
(``m = min(out, in) - k``), whose frozen copies (the ``_init`` factors) are subtracted again:

    y = base(x) + x (U_low S_low V_low - U_init S_init V_init)^T

computed through the rank-``2m`` factors, never the ``[out, in]`` matrix. Gradients of ``U_low``
and ``V_low`` are projected orthogonal to ``U_high`` / ``V_high`` (PEFT's gradient hooks;
:func:`orthogonal_gradient`), so training never moves the preserved subspace. The frozen factors
are not saved: they are the SVD of the weight, taken again when the adapter loads, as in PEFT.

On disk (PEFT's keys): ``<path>.osf_svd_params.U_low``, ``.S_low``, ``.V_low``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass

PARTS = ("U_low", "S_low", "V_low")


class OSFFrozen(nnx.Variable):
    """An OSF adapter's frozen SVD factors (its start, and the preserved subspace): not saved."""


@dataclasses.dataclass(frozen=True)
class OSFSpec:
    """Static settings of one OSF adapter on one layer."""

    effective_rank: int


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def orthogonal_gradient(factor: jax.Array, high: jax.Array, side: str) -> jax.Array:
    """``factor`` unchanged; its gradient projected orthogonal to the frozen ``high`` subspace:
    ``g - high (high^T g)`` for a ``U`` (``side="U"``, ``high [out, k]``), ``g - (g high^T) high``
    for a ``V`` (``side="V"``, ``high [k, in]``)."""
    del high, side
    return factor


def _orthogonal_fwd(factor, high, side):
    return factor, high


def _orthogonal_bwd(side, high, g):
    if side == "U":
        return g - high @ (high.T @ g), jnp.zeros_like(high)
    return g - (g @ high.T) @ high, jnp.zeros_like(high)


orthogonal_gradient.defvjp(_orthogonal_fwd, _orthogonal_bwd)


class OSFLayer(AdditiveLayer):
    """Mixin marking an OSF layer (``isinstance(m, OSFLayer)`` finds them)."""

    method_name = "OSF"
    status_module_type = "osf.Linear"
    weight_dicts = tuple(f"osf_{p}" for p in PARTS)
    cache_dicts = ("osf_U_init", "osf_S_init", "osf_V_init", "osf_U_high", "osf_V_high")

    def add_osf(self, name: str, spec: OSFSpec, trained: dict, frozen: dict) -> None:
        """``trained``: ``U_low``, ``S_low``, ``V_low``; ``frozen``: ``U_init``, ``S_init``, ``V_init``,
        ``U_high``, ``V_high`` (torch layouts, float32)."""
        self._check_new(name)
        for part, value in trained.items():
            getattr(self, f"osf_{part}")[name] = AdapterParam(jnp.asarray(value, jnp.float32))
        for part, value in frozen.items():
            getattr(self, f"osf_{part}")[name] = OSFFrozen(jnp.asarray(value, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {f"osf_svd_params.{p}": (getattr(self, f"osf_{p}"), same, same) for p in PARTS}

    def _describe(self, name: str) -> str:
        return f"OSF effective_rank={self.spec(name).effective_rank}"

    def _value(self, part: str, name: str) -> jax.Array:
        return getattr(self, f"osf_{part}")[name].get_value().astype(jnp.float32)

    def _factors(self, name: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(U_low, S_low, V_low)``, the ``U`` and ``V`` gradients projected off the frozen subspace."""
        u = orthogonal_gradient(self._value("U_low", name), self._value("U_high", name), "U")
        v = orthogonal_gradient(self._value("V_low", name), self._value("V_high", name), "V")
        return u, self._value("S_low", name), v

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight``, ``U S V - U0 S0 V0``, in the kernel's ``[in, out]`` layout."""
        u, s, v = self._factors(name)
        u0, s0, v0 = (self._value(p, name) for p in ("U_init", "S_init", "V_init"))
        return ((u * s[None, :]) @ v - (u0 * s0[None, :]) @ v0).T

    def _update(self, x: jax.Array, name: str) -> jax.Array:
        u, s, v = self._factors(name)
        u0, s0, v0 = (self._value(p, name) for p in ("U_init", "S_init", "V_init"))
        h = x.astype(jnp.float32)
        return ((h @ v.T) * along_last(s, h.ndim)) @ u.T - ((h @ v0.T) * along_last(s0, h.ndim)) @ u0.T

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, _: self._update(x, name))


def osf_class_for(module) -> type:
    if isinstance(module, OSFLayer):
        return type(module)
    return mixin_subclass(type(module), OSFLayer, "OSF")
