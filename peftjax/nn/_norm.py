"""RMSNorm whose gradient keeps only the input: ``nnx.RMSNorm``'s values, a leaner backward pass.

Autodiff of ``nnx.RMSNorm`` saves ``x``, ``x**2`` and the scaled product (three
``[tokens, hidden]`` arrays per norm, two norms per decoder layer) although the input and the
per-row ``1 / rms`` determine the derivative. :func:`rms_norm` computes the same values in float32
and differentiates them by hand from ``x``, ``scale`` and ``1 / rms``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, epsilon: float) -> jax.Array:
    """``x / sqrt(mean(x**2) + epsilon) * scale`` over the last axis, in float32.

    The result has the dtype ``x`` and ``scale`` promote to (``nnx.RMSNorm``'s). Differentiable in
    ``x`` and ``scale`` (LN tuning trains the scale).

    >>> x, s = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([1.0, 0.5, 2.0])
    >>> norm = nnx.RMSNorm(3, epsilon=1e-6, rngs=nnx.Rngs(0))
    >>> norm.scale.set_value(s)
    >>> bool(jnp.allclose(rms_norm(x, s, 1e-6), norm(x)))
    True
    """
    return _forward(x, scale, epsilon)[0]


def _forward(x, scale, epsilon):
    h = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + epsilon)
    y = h * (inv * _along_last(scale.astype(jnp.float32), h.ndim))
    return y.astype(jnp.result_type(x, scale)), inv


def _rms_norm_fwd(x, scale, epsilon):
    y, inv = _forward(x, scale, epsilon)
    return y, (x, scale, inv)


def _rms_norm_bwd(epsilon, residuals, g):
    # y = h * inv * w with inv = (mean(h**2) + eps)**-1/2, so d inv / d h_j = -inv**3 * h_j / n
    x, scale, inv = residuals
    h, g = x.astype(jnp.float32), g.astype(jnp.float32)
    w = _along_last(scale.astype(jnp.float32), h.ndim)
    gw = g * w
    dx = inv * gw - h * inv**3 * jnp.mean(h * gw, axis=-1, keepdims=True)
    dscale = jnp.sum((g * h * inv).reshape(-1, h.shape[-1]), axis=0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _along_last(scale: jax.Array, ndim: int) -> jax.Array:
    return scale.reshape((1,) * (ndim - 1) + scale.shape)


class RMSNorm(nnx.RMSNorm):
    """``nnx.RMSNorm`` (same parameter, same values) computed by :func:`rms_norm` when it
    normalises the last axis with a scale and no mask or named axis; as ``nnx.RMSNorm`` otherwise."""

    def __call__(self, x, mask=None):
        plain = mask is None and self.scale is not None and self.axis_name is None
        if not (plain and _last_axis(self.reduction_axes, x.ndim) and _last_axis(self.feature_axes, x.ndim)):
            return super().__call__(x, mask)
        x, scale = self.promote_dtype((x, self.scale[...]), dtype=self.dtype)
        return rms_norm(x, scale, self.epsilon)


def _last_axis(axes, ndim: int) -> bool:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return axes in ((-1,), (ndim - 1,))
