"""OFT for Flax NNX: an orthogonal block-diagonal rotation of a layer's input (or embedding output).

As in HF PEFT 0.22.0 (``peft/tuners/oft/layer.py``), a targeted ``nnx.Linear`` computes
``base(x R)`` with ``R = block_diag(R_0, ..., R_{k-1})``; each ``b x b`` block is the Cayley
transform (:mod:`peftjax.tuners.oft._math`) of the skew-symmetric matrix whose strict upper
triangle is one row of the trained ``oft_R`` (``[k, b (b - 1) / 2]``; ``[1, ...]`` with
``block_share``, the one block then repeated). An ``nnx.Embed`` rotates its output instead:
``embed(ids) R``, PEFT's ``oft_embedding_R``. Several active adapters rotate one after the other.

Training-only options, driven by the step's key (``peftjax.dropout_key``):

- ``module_dropout = p``: ``int(p * k)`` random blocks of ``R`` become the identity (PEFT's
  ``MultiplicativeDropoutLayer``; skipped with ``block_share``). PEFT 0.22.0 constructs that layer
  but its forward never calls it, so its training ignores ``module_dropout``; peftjax applies
  the option's definition. Evaluation (no key) is unaffected either way.
- ``coft``: PEFT projects ``oft_R`` in place, under ``no_grad``, before each use. Here the
  forward uses the projection with a straight-through gradient (``w + stop_gradient(P(w) - w)``,
  the gradient PEFT's in-place copy yields), and the saved file and merges hold the projected
  values, as PEFT's do. The stored parameter itself is not overwritten between steps.

``merge`` folds ``R`` into the weight: ``kernel <- R kernel`` (``[in, out]`` here), an embedding
table ``E <- E R``; ``unmerge`` multiplies by ``R^-1`` (PEFT's ``torch.linalg.inv``).

On disk (PEFT's keys): ``base_model.model.<path>.oft_R.weight`` and, for embeddings,
``<path>.oft_embedding_R.weight``, both ``[k or 1, b (b - 1) / 2]``.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import active_dropout_key, fold_key
from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass
from peftjax.tuners.oft._math import (
    cayley_exact,
    cayley_neumann,
    coft_project,
    identity_blocks,
    rotate_blocks,
    skew_from_vector,
)


@dataclasses.dataclass(frozen=True)
class OFTSpec:
    """Static settings of one OFT adapter on one layer.

    Attributes:
      r: the number of blocks ``k`` (``n_in // block_size``).
      block_size: ``b``.
      block_share: one stored block serves all ``k``.
      coft: constrained OFT, radius ``eps``.
      eps: the COFT radius.
      use_cayley_neumann: the truncated series instead of the exact transform.
      num_cayley_neumann_terms: the series length.
      module_dropout: the multiplicative dropout rate while training.
    """

    r: int
    block_size: int
    block_share: bool = False
    coft: bool = False
    eps: float = 6e-5
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    module_dropout: float = 0.0


def rotation_blocks(vec: jax.Array, spec: OFTSpec) -> jax.Array:
    """The ``[k or 1, b, b]`` orthogonal blocks of a stored ``oft_R`` (COFT applied)."""
    if spec.coft:
        vec = vec + jax.lax.stop_gradient(coft_project(vec, spec.block_size, spec.eps) - vec)
    q = skew_from_vector(vec, spec.block_size)
    if spec.use_cayley_neumann:
        return cayley_neumann(q, spec.num_cayley_neumann_terms)
    return cayley_exact(q)


class OFTLayer(AdapterDictLayer):
    """Mixin marking an OFT layer (``isinstance(m, OFTLayer)`` finds them)."""

    method_name = "OFT"
    weight_dicts = ("oft_R", "oft_embedding_R")
    oft_kind: str = "linear"
    reports_quantization_backend = True  # PEFT's status names bitsandbytes' backend for it

    @property
    def _store(self) -> nnx.Dict:
        return self.oft_embedding_R if self.oft_kind == "embed" else self.oft_R

    def add_oft(self, name: str, spec: OFTSpec, key: jax.Array, init: bool = True) -> None:
        self._check_new(name)
        shape = (1 if spec.block_share else spec.r, spec.block_size * (spec.block_size - 1) // 2)
        value = jnp.zeros(shape, jnp.float32) if init else 0.1 * jax.random.normal(key, shape, jnp.float32)
        self._store[name] = AdapterParam(value)
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        spec = self.spec(name)

        def to_torch(vec):  # PEFT stores the projected values (its forward copies them in)
            return coft_project(vec, spec.block_size, spec.eps) if spec.coft else vec

        suffix = "oft_embedding_R.weight" if self.oft_kind == "embed" else "oft_R.weight"
        return {suffix: (self._store, to_torch, lambda v: v)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"OFT r={spec.r}, oft_block_size={spec.block_size}, block_share={spec.block_share}"

    def _blocks(self, name: str, spec: OFTSpec, training_key) -> jax.Array:
        """The ``[k, b, b]`` rotation of adapter ``name``, with module dropout while training."""
        blocks = rotation_blocks(self._store[name].get_value(), spec)
        d = blocks.shape[0]
        if training_key is not None and spec.module_dropout > 0 and d > 1:
            key = fold_key(training_key, zlib.crc32(f"{self.adapter_path}/{name}".encode()))
            blocks = identity_blocks(blocks, int(spec.module_dropout * d), key)
        return jnp.broadcast_to(blocks, (spec.r,) + blocks.shape[1:])

    def _rotate(self, v: jax.Array) -> jax.Array:
        """``v`` rotated by every live adapter in turn, in the adapters' dtype, back to ``v``'s."""
        live = self._live_adapters()
        if not live:
            return v
        key = active_dropout_key()
        out = v
        for name, spec in live:
            blocks = self._blocks(name, spec, key)
            out = rotate_blocks(out.astype(blocks.dtype), blocks)
        return out.astype(v.dtype)

    def rotation_matrix(self, name: str) -> jax.Array:
        """The full ``[n, n]`` orthogonal matrix of adapter ``name`` (PEFT's ``get_delta_weight``)."""
        spec = self.spec(name)
        n = spec.r * spec.block_size
        return rotate_blocks(jnp.eye(n, dtype=jnp.float32), self._blocks(name, spec, None))

    def merge_adapter(self, name: str) -> None:
        self._fold(name, self.rotation_matrix(name))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._fold(name, jnp.linalg.inv(self.rotation_matrix(name)))
        self._mark_merged(name, False)


class OFTLinear(OFTLayer):
    """OFT on ``nnx.Linear``: ``base(x R)``; several adapters rotate ``x R1 R2``, so they merge
    last to first into ``R1 R2 kernel`` (PEFT 0.22; 0.21.2 merged ``R2 R1 kernel``)."""

    merge_last_first = True

    def __call__(self, x, *args, **kwargs):
        return self._peftjax_base.__call__(self, self._rotate(x), *args, **kwargs)

    def _fold(self, name: str, mat: jax.Array) -> None:
        w = self.kernel.get_value()  # [in, out]: x R W^T = x (R kernel)
        self.kernel.set_value((mat @ w.astype(jnp.float32)).astype(w.dtype))


class OFTEmbed(OFTLayer):
    """OFT on ``nnx.Embed``: ``embed(ids) R`` (PEFT's ``oft_embedding_R``)."""

    oft_kind = "embed"

    def __call__(self, x, *args, **kwargs):
        return self._rotate(self._peftjax_base.__call__(self, x, *args, **kwargs))

    def _fold(self, name: str, mat: jax.Array) -> None:
        table = self.embedding.get_value()  # [num, dim]
        self.embedding.set_value((table.astype(jnp.float32) @ mat).astype(table.dtype))


def oft_class_for(module: nnx.Module) -> type:
    if isinstance(module, OFTLayer):
        return type(module)
    if isinstance(module, nnx.Embed):
        return mixin_subclass(type(module), OFTEmbed, "OFT")
    return mixin_subclass(type(module), OFTLinear, "OFT")
