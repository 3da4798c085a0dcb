"""BOFT for Flax NNX: a butterfly product of permuted block-diagonal rotations, and an output scale.

As in HF PEFT 0.22.0 (``peft/tuners/boft/layer.py``), a targeted ``nnx.Linear`` computes
``(base(x M) - bias) * s + bias``. ``boft_R`` is ``[m, d, b, b]`` (``m`` butterfly factors of
``d`` blocks): each block is made skew-symmetric (``(A - A^T) / 2``) and mapped through the
exact Cayley transform ``(I - Q)(I + Q)^-1``; factor ``i`` is ``M_i = P_i block_diag(...) P_i^T``
with PEFT's butterfly permutation ``P_i``, and ``M = M_{m-1} ... M_1 M_0``. ``boft_s`` is
``[out, 1]``. Several active adapters compose: ``M = M_last ... M_first``, the scales multiply.

``boft_dropout = p`` while training (the step's key, ``peftjax.dropout_key``): in one random
factor, ``int(p * d)`` random blocks become the identity (PEFT's ``MultiplicativeDropoutLayer``).

``merge``: ``kernel <- (M kernel) * s`` (``[in, out]`` here; the bias stays); ``unmerge``:
``kernel <- (M^T kernel) / s``, as PEFT (``M`` is orthogonal).

PEFT builds ``m > 1`` factors only with its CUDA extension; on a CPU it trains with one factor
whatever the config says. peftjax always follows the config.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.nn._dropout import active_dropout_key, fold_key
from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass
from peftjax.tuners.oft._math import cayley_exact, identity_blocks, rotate_blocks


@dataclasses.dataclass(frozen=True)
class BOFTSpec:
    """Static settings of one BOFT adapter on one layer.

    Attributes:
      n_factors: the butterfly factors ``m`` (the config's ``boft_n_butterfly_factor``).
      block_num: blocks per factor ``d``.
      block_size: ``b``.
      dropout: the multiplicative dropout rate while training.
    """

    n_factors: int
    block_num: int
    block_size: int
    dropout: float = 0.0


def block_butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> np.ndarray:
    """PEFT's ``block_butterfly_perm``: within each of ``b`` groups, blocks of ``r`` reordered evens-then-odds."""
    if n_butterfly_factor == 0:
        return np.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    group = n // b
    step = group / r
    order = np.concatenate([np.arange(0, step, 2), np.arange(1, step, 2)]).astype(int)
    sorted_order = np.concatenate([np.arange(pos * r, pos * r + r) for pos in order])
    indices = np.arange(n)
    for i in range(0, n, group):
        indices[i : i + group] = indices[i : i + group][sorted_order]
    return indices


@functools.lru_cache(maxsize=64)
def butterfly_perms(n: int, spec: BOFTSpec) -> np.ndarray:
    """``[m, n]``: row ``i`` is ``perm`` with ``P_i[j, perm[j]] = 1``."""
    return np.stack([
        block_butterfly_perm(n, spec.block_num // 2**i, spec.block_size // 2, spec.n_factors - 1)
        for i in range(spec.n_factors)
    ])


@functools.partial(jax.jit, static_argnums=1)
def butterfly_blocks(boft_r: jax.Array, spec: BOFTSpec, key: jax.Array | None = None) -> jax.Array:
    """The ``[m, d, b, b]`` orthogonal blocks of a stored ``boft_R`` (with block dropout when ``key`` is given)."""
    m, d, b, _ = boft_r.shape
    blocks = cayley_exact(0.5 * (boft_r - jnp.swapaxes(boft_r, -1, -2)))
    if key is not None and spec.dropout > 0:
        pick, mask_key = jax.random.split(key)
        factor = jax.random.randint(pick, (), 0, m)
        dropped = jax.vmap(lambda f, k: identity_blocks(f, int(spec.dropout * d), k))(
            blocks, jax.random.split(mask_key, m)
        )
        blocks = jnp.where((jnp.arange(m) == factor)[:, None, None, None], dropped, blocks)
    return blocks


@functools.partial(jax.jit, static_argnums=2)
def apply_butterfly(x: jax.Array, blocks: jax.Array, spec: BOFTSpec) -> jax.Array:
    """``x @ M`` with ``M = M_{m-1} ... M_0`` and ``M_i = P_i block_diag(blocks[i]) P_i^T``, by gathers.

    With ``P[j, perm[j]] = 1``: ``x @ P = x[..., argsort(perm)]`` and ``y @ P^T = y[..., perm]``.
    """
    perms = butterfly_perms(x.shape[-1], spec)
    for i in reversed(range(blocks.shape[0])):
        x = rotate_blocks(x[..., np.argsort(perms[i])], blocks[i])[..., perms[i]]
    return x


class BOFTLayer(AdapterDictLayer):
    """Mixin marking a BOFT layer (``isinstance(m, BOFTLayer)`` finds them)."""

    method_name = "BOFT"
    weight_dicts = ("boft_R", "boft_s")
    reports_quantization_backend = True  # PEFT's status names bitsandbytes' backend for it

    def add_boft(self, name: str, spec: BOFTSpec, key: jax.Array, init: bool = True) -> None:
        self._check_new(name)
        n_out = self.kernel.get_value().shape[1]
        r_shape = (spec.n_factors, spec.block_num, spec.block_size, spec.block_size)
        if init:
            r, s = jnp.zeros(r_shape, jnp.float32), jnp.ones((n_out, 1), jnp.float32)
        else:
            kr, ks = jax.random.split(key)
            r = 0.1 * jax.random.normal(kr, r_shape, jnp.float32)
            s = 1.0 + 0.1 * jax.random.normal(ks, (n_out, 1), jnp.float32)
        self.boft_R[name] = AdapterParam(r)
        self.boft_s[name] = AdapterParam(s)
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731  (PEFT's own layouts)
        return {"boft_R": (self.boft_R, same, same), "boft_s": (self.boft_s, same, same)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return (
            f"BOFT boft_n_butterfly_factor={spec.n_factors}, boft_block_num={spec.block_num}, "
            f"boft_block_size={spec.block_size}; PEFT without its CUDA extension saves one factor whatever "
            "the config says"
        )

    def _rotate(self, x: jax.Array, name: str, key: jax.Array | None = None) -> jax.Array:
        """``x @ M`` for adapter ``name``."""
        spec = self.spec(name)
        return apply_butterfly(x, butterfly_blocks(self.boft_R[name].get_value(), spec, key), spec)

    def rotation_matrix(self, name: str) -> jax.Array:
        """The ``[in, in]`` orthogonal ``M`` of adapter ``name`` (PEFT's ``get_delta_weight``)."""
        return self._rotate(jnp.eye(self.kernel.get_value().shape[0], dtype=jnp.float32), name)

    def __call__(self, x, *args, **kwargs):
        live = self._live_adapters()
        if not live:
            return self._peftjax_base.__call__(self, x, *args, **kwargs)
        key = active_dropout_key()
        # PEFT: rotation = M_last ... M_first, x @ rotation; so the last adapter's M acts first
        rotated, scale = x.astype(jnp.float32), None
        for name, _ in reversed(live):
            k = None if key is None else fold_key(key, zlib.crc32(f"{self.adapter_path}/{name}".encode()))
            rotated = self._rotate(rotated, name, k)
            s = self.boft_s[name].get_value()[:, 0]
            scale = s if scale is None else s * scale
        y = self._peftjax_base.__call__(self, rotated.astype(x.dtype), *args, **kwargs)
        scale = along_last(scale, y.ndim)  # PEFT scales in the adapter's dtype, then casts back
        if self.bias is None:
            return (y.astype(scale.dtype) * scale).astype(y.dtype)
        bias = along_last(self.bias.get_value(), y.ndim).astype(scale.dtype)
        return ((y.astype(scale.dtype) - bias) * scale + bias).astype(y.dtype)

    def merge_adapter(self, name: str) -> None:
        w = self.kernel.get_value()
        s = self.boft_s[name].get_value()[None, :, 0]
        self.kernel.set_value(((self.rotation_matrix(name) @ w.astype(jnp.float32)) * s).astype(w.dtype))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        w = self.kernel.get_value()
        s = self.boft_s[name].get_value()[None, :, 0]
        self.kernel.set_value(((self.rotation_matrix(name).T @ w.astype(jnp.float32)) / s).astype(w.dtype))
        self._mark_merged(name, False)


def boft_class_for(module: nnx.Module) -> type:
    if isinstance(module, BOFTLayer):
        return type(module)
    return mixin_subclass(type(module), BOFTLayer, "BOFT")
