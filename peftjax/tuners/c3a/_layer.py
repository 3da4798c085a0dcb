"""C3A for Flax NNX: a block-circulant update, run as circular convolutions.

As in HF PEFT 0.22.0 (``peft/tuners/c3a/layer.py``), a targeted ``nnx.Linear`` computes

    y = base(x) + C(x) / in

where the input is cut into ``in / b`` slices of ``b`` features, output slice ``m`` is the sum
over input slices ``n`` of their circular cross-correlation with the trained kernel row
``c3a_kernel[m, n] (b)``: ``y_m[t] = sum_n sum_j x_n[j] k_mn[(j - t) mod b]``. The forward takes
real FFTs of length ``b``; ``delta_weight`` builds the same ``[out, in]`` matrix of circulant
blocks, which ``merge`` adds to the kernel.

On disk (PEFT's key): ``<path>.c3a_kernel`` ``[out / b, in / b, b]``, float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass


@dataclasses.dataclass(frozen=True)
class C3ASpec:
    """Static settings of one C3A adapter on one layer."""

    block_size: int


def block_circular(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x [..., n b]`` through the circulant blocks of ``kernel [m, n, b]``: ``[..., m b]``, float32
    (not yet divided by ``in``)."""
    m, n, b = kernel.shape
    spectrum = jnp.fft.rfft(x.astype(jnp.float32).reshape(*x.shape[:-1], n, b), axis=-1)
    mixed = jnp.einsum("...nf,mnf->...mf", spectrum, jnp.conj(jnp.fft.rfft(kernel.astype(jnp.float32), axis=-1)))
    return jnp.fft.irfft(mixed, n=b, axis=-1).reshape(*x.shape[:-1], m * b)


def circulant_delta(kernel: jax.Array, n_in: int) -> jax.Array:
    """The update as a matrix, ``[out, in]`` float32: block ``(m, n)`` has ``k_mn[(j - t) mod b]`` at
    row ``t``, column ``j``; divided by ``in``, as PEFT's ``get_delta_weight``."""
    m, n, b = kernel.shape
    t, j = jnp.arange(b)[:, None], jnp.arange(b)[None, :]
    blocks = kernel.astype(jnp.float32)[:, :, (j - t) % b]  # [m, n, b (t), b (j)]
    return blocks.transpose(0, 2, 1, 3).reshape(m * b, n * b) / n_in


class C3ALayer(AdditiveLayer):
    """Mixin marking a C3A layer (``isinstance(m, C3ALayer)`` finds them)."""

    method_name = "C3A"
    status_module_type = "c3a.C3ALinear"
    weight_dicts = ("c3a_kernel",)

    def add_c3a(self, name: str, spec: C3ASpec, kernel) -> None:
        self._check_new(name)
        self.c3a_kernel[name] = AdapterParam(jnp.asarray(kernel, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"c3a_kernel": (self.c3a_kernel, same, same)}

    def _describe(self, name: str) -> str:
        return f"C3A block_size={self.spec(name).block_size}"

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight`` (``[out, in]``), transposed to the kernel's ``[in, out]``."""
        return circulant_delta(self.c3a_kernel[name].get_value(), self.kernel.get_value().shape[0]).T

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs,
                                  lambda name, _: block_circular(x, self.c3a_kernel[name].get_value()) / x.shape[-1])


def c3a_class_for(module) -> type:
    if isinstance(module, C3ALayer):
        return type(module)
    return mixin_subclass(type(module), C3ALayer, "C3A")
