"""GLoRA for Flax NNX: ``W' = W + W * A + B`` and ``b' = b + b * D + E + W C`` on a linear layer.

As in HF PEFT 0.22.0 (``peft/tuners/glora/layer.py``), each of the five terms is a rank-``r``
product ``Xd Xu`` (``"lora"``), a trained vector ``X`` (``"vector"``: a column over the outputs for
``A``, ``B``; over the inputs for ``C``; a row for ``D``, ``E``), a trained scalar ``X``
(``"constant"``) or a frozen zero tensor (``"none"``; PEFT saves it, and its forward reads it, so
peftjax keeps it as a frozen variable that loads from the file). ``C``, ``D`` and ``E`` are zero
tensors on a layer without a bias. The forward adds

    x (W * A + B)^T  (+ b * D + E + W C, with a bias)

to the base output, forming the ``[out, in]`` update as PEFT does: ``A`` multiplies ``W`` entry by
entry, so the update cannot be applied through low-rank factors alone. ``merge`` adds it to the
kernel and bias, computed from the weights before the first merge (:class:`WeightReadingLayer`);
PEFT's own unmerge divides by ``1 + A`` and is exact only up to rounding, peftjax's restores them.

On disk (PEFT's keys): ``<path>.glora_<T>.Xd`` / ``.Xu`` / ``.X`` / ``.zeros`` for ``T`` in ``A``-``E``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.tuners.base import AdapterParam, WeightReadingLayer, layer_bias, mixin_subclass
from peftjax.tuners.base._rows import pick_rows, rows_of

TERMS = "ABCDE"
PARTS = {"lora": ("Xd", "Xu"), "vector": ("X",), "constant": ("X",), "none": ("zeros",)}


class GloraZeros(nnx.Variable):
    """A ``"none"`` term: a frozen tensor of zeros PEFT saves and reads (a buffer there)."""


@dataclasses.dataclass(frozen=True)
class GloraSpec:
    """Static settings of one GLoRA adapter on one layer: each term's kind (``"none"`` for ``C``,
    ``D``, ``E`` on a layer without a bias)."""

    r: int
    kinds: tuple[tuple[str, str], ...]  # ((term, kind), ...) for A..E

    def kind(self, term: str) -> str:
        return dict(self.kinds)[term]


class GloraLayer(WeightReadingLayer):
    """Mixin marking a GLoRA layer (``isinstance(m, GloraLayer)`` finds them)."""

    method_name = "GLoRA"
    status_module_type = "glora.GloraLinear"
    weight_dicts = tuple(f"glora_{t}_{p}" for t in TERMS for p in ("Xd", "Xu", "X"))
    cache_dicts = tuple(f"glora_{t}_zeros" for t in TERMS)
    supports_adapter_rows = True  # a different adapter per batch row, as PEFT's _mixed_batch_forward

    def add_glora(self, name: str, spec: GloraSpec, values: dict[str, jax.Array]) -> None:
        """``values``: ``{"A.Xd": ..., "C.zeros": ...}`` (torch layouts), one per part of every term."""
        self._check_new(name)
        for part, value in values.items():
            term, kind = part.split(".")
            variable = GloraZeros if kind == "zeros" else AdapterParam
            getattr(self, f"glora_{term}_{kind}")[name] = variable(jnp.asarray(value, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        spec = self.spec(name)
        return {f"glora_{t}.{p}": (getattr(self, f"glora_{t}_{p}"), same, same)
                for t in TERMS for p in PARTS[spec.kind(t)]}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"GLoRA r={spec.r}, " + ", ".join(f"{t}={spec.kind(t)}" for t in TERMS)

    def term(self, name: str, t: str) -> jax.Array:
        """Term ``t`` as PEFT's path returns it (torch layout, float32): ``Xd Xu``, ``X``, ``X[0]`` or zeros."""
        kind = self.spec(name).kind(t)
        value = lambda p: getattr(self, f"glora_{t}_{p}")[name].get_value().astype(jnp.float32)  # noqa: E731
        if kind == "lora":
            return value("Xd") @ value("Xu")
        if kind == "constant":
            return value("X")[0]
        return value("zeros" if kind == "none" else "X")

    def merge_deltas(self, name: str, weight: jax.Array, bias: jax.Array | None):
        """``W * A + B`` in the kernel's ``[in, out]`` layout and, with a bias, ``b * D + E + W C``."""
        a, b = self.term(name, "A"), self.term(name, "B")
        dw = weight * a.T + b.T  # a term of shape [out, 1] or () transposes to a broadcastable one
        if bias is None:
            return dw, None
        c = self.term(name, "C")  # [in, 1]
        return dw, bias * self.term(name, "D") + self.term(name, "E") + (c.T @ weight)[0]

    def _update(self, x: jax.Array, name: str) -> jax.Array:
        kernel = self.kernel.get_value().astype(jnp.float32)
        bias = layer_bias(self)
        dw, db = self.merge_deltas(name, kernel, None if bias is None else bias.get_value().astype(jnp.float32))
        out = x.astype(jnp.float32) @ dw
        return out if db is None else out + along_last(db, out.ndim)

    def __call__(self, x, *args, **kwargs):
        mixed = rows_of(self)
        if mixed is None:
            return self._plus_updates(x, args, kwargs, lambda name, _: self._update(x, name))
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        if not self._serves_rows():
            return y
        rows, names = mixed  # each row updated by its own adapter (the base's rows by none)
        out, own = y.astype(jnp.float32), self.adapter_names()
        return pick_rows(rows, [out + self._update(x, n) if n in own else out for n in names], out).astype(y.dtype)


def glora_class_for(module) -> type:
    if isinstance(module, GloraLayer):
        return type(module)
    return mixin_subclass(type(module), GloraLayer, "GLoRA")
