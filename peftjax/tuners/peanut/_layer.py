"""PEANuT for Flax NNX: ``delta_W^T = s * B(g(W^T A^T))``, a network applied to the frozen weight.

As in HF PEFT 0.22.0 (``peft/tuners/peanut/layer.py``), with the trained ``A [r, out]``, ``depth``
encoders and decoders ``[r, r]`` and ``B [out, r]`` (torch ``nn.Linear`` weights, no biases) and the
activation ``f``, the update starts from the kernel (``W^T``, ``[in, out]``):

    h = f(W^T A^T);  encoders: keep h, h = f(h E_i^T);  decoders: h = f(h D_i^T) + kept[-1 - i]
    delta (kernel layout) = s * h B^T

and a targeted layer adds ``x delta``. ``merge`` adds the delta computed from the weight before
the first merge, kept while one is merged (as PEFT keeps it; :class:`WeightReadingLayer`).

On disk (PEFT's keys): ``<path>.peanut_A.weight``, ``.peanut_B.weight``,
``.peanut_encoders.<i>.weight`` and ``.peanut_decoders.<i>.weight``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._activations import ACTIVATIONS
from peftjax.tuners.base import AdapterParam, WeightReadingLayer, mixin_subclass


@dataclasses.dataclass(frozen=True)
class PeanutSpec:
    """Static settings of one PEANuT adapter on one layer."""

    r: int
    depth: int
    act_fn: str
    scaling: float


def peanut_delta(kernel: jax.Array, a, encoders, decoders, b, spec: PeanutSpec) -> jax.Array:
    """The update in the kernel's ``[in, out]`` layout (float32) from the kernel and the network's weights."""
    f = ACTIVATIONS[spec.act_fn]
    h = f(kernel.astype(jnp.float32) @ a.T)
    kept = []
    for e in encoders:
        kept.append(h)
        h = f(h @ e.T)
    for i, d in enumerate(decoders):
        h = f(h @ d.T) + kept[len(kept) - 1 - i]
    return spec.scaling * (h @ b.T)


class PeanutLayer(WeightReadingLayer):
    """Mixin marking a PEANuT layer (``isinstance(m, PeanutLayer)`` finds them).

    ``peanut_encoders`` / ``peanut_decoders`` hold one ``{adapter: weight}`` dict per depth index
    (``"0"``, ``"1"``, ...), so adapters of different depths share a layer.
    """

    method_name = "PEANuT"
    status_module_type = "peanut.Linear"
    weight_dicts = ("peanut_A", "peanut_B")
    stack_dicts = ("peanut_encoders", "peanut_decoders")

    def _adapter_setup(self, path: str) -> None:
        if not hasattr(self, "adapter_specs"):
            WeightReadingLayer._adapter_setup(self, path)
            for attr in self.stack_dicts:
                setattr(self, attr, nnx.Dict())

    def remove_adapter_state(self) -> None:
        WeightReadingLayer.remove_adapter_state(self)
        for attr in self.stack_dicts:
            if hasattr(self, attr):
                delattr(self, attr)

    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        stacked = tuple(d for attr in self.stack_dicts for d in getattr(self, attr).values())
        return tuple(getattr(self, attr) for attr in self.weight_dicts) + stacked

    def add_peanut(self, name: str, spec: PeanutSpec, a, encoders, decoders, b) -> None:
        self._check_new(name)
        self.peanut_A[name] = AdapterParam(jnp.asarray(a, jnp.float32))
        self.peanut_B[name] = AdapterParam(jnp.asarray(b, jnp.float32))
        for attr, weights in (("peanut_encoders", encoders), ("peanut_decoders", decoders)):
            stack = getattr(self, attr)
            for i, w in enumerate(weights):
                if str(i) not in stack:
                    stack[str(i)] = nnx.Dict()
                stack[str(i)][name] = AdapterParam(jnp.asarray(w, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        layout = {"peanut_A.weight": (self.peanut_A, same, same), "peanut_B.weight": (self.peanut_B, same, same)}
        for attr in self.stack_dicts:
            for i in range(self.spec(name).depth):
                layout[f"{attr}.{i}.weight"] = (getattr(self, attr)[str(i)], same, same)
        return layout

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"PEANuT r={spec.r}, depth={spec.depth}"

    def _network(self, name: str):
        depth = self.spec(name).depth
        value = lambda d: d[name].get_value().astype(jnp.float32)  # noqa: E731
        return (value(self.peanut_A), [value(self.peanut_encoders[str(i)]) for i in range(depth)],
                [value(self.peanut_decoders[str(i)]) for i in range(depth)], value(self.peanut_B))

    def merge_deltas(self, name: str, weight: jax.Array, bias: jax.Array | None):
        return peanut_delta(weight, *self._network(name), self.spec(name)), None

    def _update(self, x: jax.Array, name: str) -> jax.Array:
        delta = peanut_delta(self.kernel.get_value(), *self._network(name), self.spec(name))
        return x.astype(jnp.float32) @ delta

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, _: self._update(x, name))


def peanut_class_for(module) -> type:
    if isinstance(module, PeanutLayer):
        return type(module)
    return mixin_subclass(type(module), PeanutLayer, "PEANuT")
