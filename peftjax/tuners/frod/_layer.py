"""FRoD for Flax NNX: the weight rewritten in a basis shared by its kind of layer, trained there.

As in HF PEFT 0.22.0 (``peft/tuners/frod/layer.py``), a targeted linear layer of kind ``k`` (PEFT's
category: ``self_attn_q_proj``, ``mlp_down_proj``, ...) holds a reference to its kind's frozen
basis ``V [in, in]`` and sparse positions ``P [2, nnz]``, its own frozen ``U [out, in]`` (unit
columns, ``W = U diag(norms) V^T``), and the trained ``lambda [in]`` and ``s [nnz]``:

    W' = U (S + diag(lambda)) V^T,   S[P[0], P[1]] = s,   y = x W'^T + b

(computed as ``((x V) S^T + (x V) * lambda) U^T``, never forming ``W'``). With one live adapter
and no active dropout the base product is not computed at all; otherwise, and while its dropout
is active, the layer adds ``(W' - W) dropout(x)`` to the base output, as PEFT does.

``merge`` adds ``W' - W0`` with ``W0`` the weight before any FRoD merge (kept while one is merged,
as PEFT keeps it); unmerging the last restores ``W0`` exactly.

On disk (PEFT's keys): ``<path>.frod_lambda_l`` ``[in]`` and ``<path>.frod_lambda_s_values``
``[nnz]``; each kind's ``base_model.frod_V.<kind>``, ``base_model.frod_s_indices.<kind>`` (int64)
and ``base_model.frod_s_size.<kind>`` (``[in, in]``, int64). ``U`` is not saved: it is computed
from the weight and ``V`` (float64), at injection and again when a file's ``V`` is loaded.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.nn._dropout import active_dropout_key, apply_dropout
from peftjax.tuners.base import AdapterParam, WeightReadingLayer, layer_bias, mixin_subclass


class FrodShared(nnx.Variable):
    """A kind's frozen basis ``V`` or sparse positions, one variable all its layers reference."""


class FrodBasis(nnx.Variable):
    """A layer's frozen ``U [out, in]`` (not saved: computed from the weight and ``V``)."""


@dataclasses.dataclass(frozen=True)
class FrodSpec:
    """Static settings of one FRoD adapter on one layer: its kind (PEFT's category) and dropout."""

    kind: str
    dropout: float = 0.0


def basis_and_norms(v: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``U [out, in]`` and ``lambda [in]`` of ``weight [out, in]`` in the basis ``v [in, in]``
    (float64: ``W V^-T``'s columns normalised, their norms; ``pinv`` where ``v`` is singular),
    returned float32."""
    w, v = np.asarray(weight, np.float64), np.asarray(v, np.float64)
    try:
        b = np.linalg.solve(v, w.T).T
    except np.linalg.LinAlgError:
        b = w @ np.linalg.pinv(v, rcond=1e-6).T
    norms = np.linalg.norm(b, axis=0)
    nonzero = norms > 1e-12
    u = np.zeros_like(b)
    u[:, nonzero] = b[:, nonzero] / norms[nonzero]
    return u.astype(np.float32), norms.astype(np.float32)


class FrodLayer(WeightReadingLayer):
    """FRoD on ``nnx.Linear`` (GPT-2's ``Conv1D`` too; ``isinstance(m, FrodLayer)`` finds them)."""

    method_name = "FRoD"
    status_module_type = "frod.Linear"
    weight_dicts = ("frod_lambda_l", "frod_lambda_s_values")
    cache_dicts = ("frod_V", "frod_s_indices", "frod_U")

    def add_frod(self, name: str, spec: FrodSpec, basis: FrodShared, positions: FrodShared) -> None:
        """Adds adapter ``name`` in its kind's ``basis`` and ``positions`` at PEFT's start (the
        base itself): ``U`` and ``lambda`` (the column norms) from the weight, ``S`` zero."""
        self._check_new(name)
        self.frod_V[name], self.frod_s_indices[name] = basis, positions
        self.frod_U[name] = FrodBasis(jnp.zeros(self.torch_weight().shape, jnp.float32))
        norms = self.rebase(name)
        self.frod_lambda_l[name] = AdapterParam(jnp.asarray(norms))
        self.frod_lambda_s_values[name] = AdapterParam(jnp.zeros(positions.get_value().shape[1], jnp.float32))
        self._add_spec(name, spec)

    def torch_weight(self) -> np.ndarray:
        """The base weight in torch's ``[out, in]`` layout, float32, on the host."""
        return np.asarray(self.kernel.get_value(), np.float32).T

    def rebase(self, name: str) -> np.ndarray:
        """Sets ``U`` from the weight and the kind's current ``V``; returns the column norms (the
        ``lambda`` that makes the adapter the base)."""
        u, norms = basis_and_norms(np.asarray(self.frod_V[name].get_value()), self.torch_weight())
        self.frod_U[name].set_value(jnp.asarray(u))
        return norms

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"frod_lambda_l": (self.frod_lambda_l, same, same),
                "frod_lambda_s_values": (self.frod_lambda_s_values, same, same)}

    def _describe(self, name: str) -> str:
        return f"FRoD ({self.spec(name).kind}, {self.frod_s_indices[name].get_value().shape[1]} sparse entries)"

    def _sparse(self, name: str) -> jax.Array:
        """``S [in, in]``: the trained values at the kind's positions (a duplicate position sums)."""
        n = self.frod_V[name].get_value().shape[0]
        rows, cols = self.frod_s_indices[name].get_value()
        return jnp.zeros((n, n), jnp.float32).at[rows, cols].add(self.frod_lambda_s_values[name].get_value())

    def adapted_weight(self, name: str) -> jax.Array:
        """``W' = U (S + diag(lambda)) V^T`` in the kernel's ``[in, out]`` layout, float32."""
        u, v = self.frod_U[name].get_value(), self.frod_V[name].get_value()
        middle = self._sparse(name) + jnp.diag(self.frod_lambda_l[name].get_value())
        return (u @ middle @ v.T).T

    def merge_deltas(self, name: str, weight: jax.Array, bias: jax.Array | None):
        return self.adapted_weight(name) - weight, None

    def _product(self, h: jax.Array, name: str) -> jax.Array:
        """``h W'^T`` for float32 ``h [..., in]``, through the basis (``W'`` never formed)."""
        z = h @ self.frod_V[name].get_value()
        z = z @ self._sparse(name).T + z * along_last(self.frod_lambda_l[name].get_value(), z.ndim)
        return z @ self.frod_U[name].get_value().T

    def _update(self, x: jax.Array, name: str, spec: FrodSpec) -> jax.Array:
        """``(W' - W) dropout(x)``: what the adapter adds to the base output."""
        h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
        return self._product(h, name) - h @ self.kernel.get_value().astype(jnp.float32)

    def __call__(self, x, *args, **kwargs):
        live = self._live_adapters()
        if len(live) == 1 and not (live[0][1].dropout > 0 and active_dropout_key() is not None):
            out = self._product(x.astype(jnp.float32), live[0][0])  # the base product is not needed
            bias = layer_bias(self)
            if bias is not None:
                out = out + along_last(bias.get_value().astype(jnp.float32), out.ndim)
            kernel = self.kernel.get_value()
            dtype = getattr(self, "dtype", None) or jnp.result_type(
                x, kernel, *([] if bias is None else [bias.get_value()]))
            return out.astype(dtype)
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


def frod_class_for(module: nnx.Module) -> type:
    if isinstance(module, FrodLayer):
        return type(module)
    return mixin_subclass(type(module), FrodLayer, "FRoD")
