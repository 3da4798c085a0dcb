"""LiLy for Flax NNX: a layer's low-rank input projection shared with its neighbours, its
up-projections shared with every layer of its kind, mixed by its own router.

As in HF PEFT 0.22.0 (``peft/tuners/lily/layer.py``), a targeted ``nnx.Linear`` computes

    h = x A^T,   p = mean over every position of softmax(h R^T),   y = base(x) + s * h (sum_e p_e B_e)

with ``A [r, in]`` (torch ``lily_A.weight``; one variable for ``stride_A`` consecutive layers of
the same target), ``B [num_B * r, out]`` read as ``[num_B, r, out]`` (``lily_B.weight``; one
variable for every layer of that target and shape) and the layer's router ``R [num_B, r]``. The
average runs over the whole batch, padding included, as PEFT's does. The mixture depends on the
input, so a LiLy adapter does not merge (PEFT raises too).

On disk (PEFT's keys): every layer's ``<path>.lily_A.weight``, ``.lily_B.weight`` (the shared
values, repeated) and ``.lily_router.weight``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass


@dataclasses.dataclass(frozen=True)
class LilySpec:
    """Static settings of one LiLy adapter on one layer."""

    r: int
    num_b: int
    scaling: float = 1.0


class LilyLayer(AdapterDictLayer):
    """Mixin marking a LiLy layer (``isinstance(m, LilyLayer)`` finds them)."""

    method_name = "LiLy"
    status_module_type = "lily.Linear"
    weight_dicts = ("lily_A", "lily_B", "lily_router")  # A and B: variables shared with other layers

    def add_lily(self, name: str, spec: LilySpec, a: AdapterParam, b: AdapterParam, router) -> None:
        self._check_new(name)
        self.lily_A[name], self.lily_B[name] = a, b
        self.lily_router[name] = AdapterParam(jnp.asarray(router, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"lily_A.weight": (self.lily_A, same, same), "lily_B.weight": (self.lily_B, same, same),
                "lily_router.weight": (self.lily_router, same, same)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"LiLy r={spec.r}, num_B={spec.num_b}"

    def _update(self, x: jax.Array, name: str, spec: LilySpec) -> jax.Array:
        a = self.lily_A[name].get_value().astype(jnp.float32)
        b = self.lily_B[name].get_value().astype(jnp.float32).reshape(spec.num_b, spec.r, -1)
        h = x.astype(jnp.float32) @ a.T
        probs = jax.nn.softmax(h @ self.lily_router[name].get_value().astype(jnp.float32).T, axis=-1)
        mixture = probs.reshape(-1, spec.num_b).mean(axis=0)  # over every position of the batch
        return spec.scaling * (h @ jnp.einsum("e,eio->io", mixture, b))

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))

    def merge_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{self.adapter_path}: merging is not supported for LiLy (its mixture of B "
                                  "depends on the input), as in PEFT")

    def unmerge_adapter(self, name: str) -> None:
        raise NotImplementedError("unmerging is not supported for LiLy, as in PEFT")


def lily_class_for(module) -> type:
    if isinstance(module, LilyLayer):
        return type(module)
    return mixin_subclass(type(module), LilyLayer, "Lily")
