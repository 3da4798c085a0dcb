"""DEFT for Flax NNX: ``W' = (I - P_proj) W + Q_P (s R)`` on a linear layer, never formed.

As in HF PEFT 0.22.0 (``peft/tuners/deft/layer.py``), with the trained ``deft_P [out, r]`` and
(unless PaRa) ``deft_R [r, in]``, :func:`deft_projection` gives ``Q_P`` and ``right`` with
``P_proj = Q_P right^T``. A targeted layer computes, in float32,

    y = base(x) - ((base(x) - b) right) Q_P^T + (dropout(x) (s R)^T) Q_P^T

(``b`` the base bias, if any; no injection term with ``para``). The update's only dependence on
the weight is ``right^T W``, so ``merge`` adds ``Q_P (s R - right^T W)`` with ``W`` the weight
before the first merge (:class:`WeightReadingLayer`), as PEFT caches ``right^T W`` to unmerge.

On disk (PEFT's keys): ``<path>.deft_P`` and ``.deft_R``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.nn._broadcast import along_last
from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdapterParam, WeightReadingLayer, layer_bias, mixin_subclass


@dataclasses.dataclass(frozen=True)
class DeftSpec:
    """Static settings of one DEFT adapter on one layer."""

    r: int
    decomposition: str = "relu"
    scaling: float = 1.0
    para: bool = False
    dropout: float = 0.0


def deft_projection(p: jax.Array, decomposition: str) -> tuple[jax.Array, jax.Array]:
    """``(Q_P, right)`` (float32, ``[out, r]`` each) of ``P``: ``(P, relu(P))`` or ``(Q, Q)`` of ``P = Q R``."""
    p = p.astype(jnp.float32)
    if decomposition == "relu":
        return p, jax.nn.relu(p)
    q, _ = jnp.linalg.qr(p, mode="reduced")
    return q, q


class DeftLayer(WeightReadingLayer):
    """Mixin marking a DEFT layer (``isinstance(m, DeftLayer)`` finds them)."""

    method_name = "DEFT"
    status_module_type = "deft.DeftLinear"
    weight_dicts = ("deft_P", "deft_R")

    def add_deft(self, name: str, spec: DeftSpec, p, r) -> None:
        self._check_new(name)
        self.deft_P[name] = AdapterParam(jnp.asarray(p, jnp.float32))
        if r is not None:
            self.deft_R[name] = AdapterParam(jnp.asarray(r, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"deft_P": (self.deft_P, same, same), "deft_R": (self.deft_R, same, same)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"DEFT r={spec.r}, {spec.decomposition}" + (", PaRa" if spec.para else "")

    def _projection(self, name: str) -> tuple[jax.Array, jax.Array]:
        return deft_projection(self.deft_P[name].get_value(), self.spec(name).decomposition)

    def _injection(self, name: str) -> jax.Array:
        """``s R`` (``[r, in]``, float32)."""
        return self.deft_R[name].get_value().astype(jnp.float32) * self.spec(name).scaling

    def merge_deltas(self, name: str, weight: jax.Array, bias: jax.Array | None):
        """``Q_P (s R - right^T W)`` (``-Q_P right^T W`` for PaRa), in the kernel's ``[in, out]`` layout."""
        q, right = self._projection(name)
        factor = (weight @ right).T  # right^T W, [r, in]
        inner = -factor if self.spec(name).para else self._injection(name) - factor
        return inner.T @ q.T, None

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return y
        out = y.astype(jnp.float32)
        bias = layer_bias(self)
        product = out if bias is None else out - along_last(bias.get_value().astype(jnp.float32), out.ndim)  # x W^T
        for name, spec in live:
            q, right = self._projection(name)
            out = out - (product @ right) @ q.T
            if not spec.para:
                h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
                out = out + (h @ self._injection(name).T) @ q.T
        return out.astype(y.dtype)


def deft_class_for(module) -> type:
    if isinstance(module, DeftLayer):
        return type(module)
    return mixin_subclass(type(module), DeftLayer, "DEFT")
