"""HiRA for Flax NNX: the frozen weight modulated entry by entry by a low-rank matrix.

As in HF PEFT 0.22.0 (``peft/tuners/hira/layer.py``), a targeted linear layer computes

    y = base(x) + dropout(x) (W ⊙ (B A))^T

with the trained ``hira_A [r, in]`` and ``hira_B [out, r]``: the update ``W ⊙ (B A)`` has the
weight's structure and a rank not bounded by ``r``. An embedding adds ``(E ⊙ (B A)^T)[ids]``,
computed from the looked-up rows only (``E[ids] ⊙ (A^T[ids] B^T)``), never the whole table.

``merge`` adds ``W0 ⊙ (B A)`` with ``W0`` the weight before any HiRA merge (kept while one is
merged, as PEFT keeps it); unmerging the last restores ``W0`` exactly.

On disk (PEFT's keys): ``<path>.hira_A``, ``.hira_B``; embeddings ``<path>.hira_embedding_A``
``[r, num]`` and ``.hira_embedding_B`` ``[dim, r]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdapterParam, WeightReadingLayer, mixin_subclass


@dataclasses.dataclass(frozen=True)
class HiraSpec:
    """Static settings of one HiRA adapter on one layer."""

    r: int
    dropout: float = 0.0


class HiraLayer(WeightReadingLayer):
    """Mixin marking a HiRA layer (``isinstance(m, HiraLayer)`` finds them)."""

    method_name = "HiRA"
    weight_dicts = ("hira_A", "hira_B")
    key_prefix = "hira_"

    def add_hira(self, name: str, spec: HiraSpec, a, b) -> None:
        self._check_new(name)
        self.hira_A[name] = AdapterParam(jnp.asarray(a, jnp.float32))
        self.hira_B[name] = AdapterParam(jnp.asarray(b, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {f"{self.key_prefix}A": (self.hira_A, same, same), f"{self.key_prefix}B": (self.hira_B, same, same)}

    def _describe(self, name: str) -> str:
        return f"HiRA r={self.spec(name).r}"

    def _factors(self, name: str) -> tuple[jax.Array, jax.Array]:
        return self.hira_A[name].get_value().astype(jnp.float32), self.hira_B[name].get_value().astype(jnp.float32)

    def modulation(self, name: str) -> jax.Array:
        """``B A`` in the layout of this layer's weight (``[in, out]`` kernel, ``[num, dim]`` table), float32."""
        a, b = self._factors(name)
        return a.T @ b.T

    def merge_deltas(self, name: str, weight: jax.Array, bias: jax.Array | None):
        return weight * self.modulation(name), None


class HiraLinear(HiraLayer):
    """HiRA on ``nnx.Linear`` (GPT-2's ``Conv1D`` too): ``x (W ⊙ (B A))^T`` added."""

    status_module_type = "hira.Linear"
    bnb_status_prefix = "hira."  # PEFT's own bitsandbytes layer: <prefix>Linear4bit

    def _update(self, x: jax.Array, name: str, spec: HiraSpec) -> jax.Array:
        h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
        return h @ (self.kernel.get_value().astype(jnp.float32) * self.modulation(name))

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


class HiraEmbed(HiraLayer):
    """HiRA on ``nnx.Embed``: ``(E ⊙ (B A)^T)[ids]`` added (PEFT's ``hira_embedding_A/B``)."""

    status_module_type = "hira.Embedding"
    weight_dicts = ("hira_embedding_A", "hira_embedding_B")
    weight_name = "embedding"
    key_prefix = "hira_embedding_"

    @property
    def hira_A(self):
        return self.hira_embedding_A

    @property
    def hira_B(self):
        return self.hira_embedding_B

    def _update(self, ids: jax.Array, name: str) -> jax.Array:
        a, b = self._factors(name)  # a [r, num], b [dim, r]
        return self.embedding.get_value()[ids].astype(jnp.float32) * (a.T[ids] @ b.T)  # E[ids] ⊙ ...

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, _: self._update(x, name))


def hira_class_for(module: nnx.Module) -> type:
    if isinstance(module, HiraLayer):
        return type(module)
    if isinstance(module, nnx.Embed):
        return mixin_subclass(type(module), HiraEmbed, "HiRA")
    return mixin_subclass(type(module), HiraLinear, "HiRA")
