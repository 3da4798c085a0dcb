"""Activation functions whose gradients keep only what the backward pass needs.

Autodiff of a composite function saves every intermediate its derivative touches. For the two
element-wise blocks of a transformer layer that is far more than necessary, and in a LoRA step
(frozen weights: no weight gradients, activations dominate memory) it is a large share of the
step's buffers:

- ``jax.nn.softmax`` (without ``jax_softmax_custom_jvp``) keeps its masked input and its
  un-normalised exponentials as well as its output: three ``[batch, heads, q, k]`` arrays per
  layer where the output alone determines the derivative;
- ``silu(gate) * up`` keeps ``sigmoid(gate)`` and ``silu(gate)`` beside ``gate`` and ``up``: four
  ``[tokens, intermediate]`` arrays where two suffice, the sigmoid being cheap to recompute;
- the exact GELU keeps its ``erf`` beside its input.

The functions here compute the same values with the same operations, and define their derivatives
from the minimal residuals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jax.nn.softmax(x, axis)``, differentiated from its output alone.

    The derivative is ``y * (dx - sum(y * dx))``, the rule JAX itself uses under
    ``jax_softmax_custom_jvp``; the backward pass keeps only ``y``.

    >>> x = jnp.array([[1.0, 2.0, 3.0]])
    >>> bool(jnp.allclose(softmax(x), jax.nn.softmax(x)))
    True
    """
    unnormalized = jnp.exp(x - jnp.max(x, axis, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis, keepdims=True))


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``jax.nn.silu(gate) * up`` (Llama's gated MLP), keeping only ``gate`` and ``up`` for the
    backward pass, which recomputes the sigmoid.

    >>> g, u = jnp.array([-1.0, 0.5]), jnp.array([2.0, 3.0])
    >>> bool(jnp.allclose(swiglu(g, u), jax.nn.silu(g) * u))
    True
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return jax.nn.silu(gate) * up, (gate, up)


def _swiglu_bwd(residuals, g):
    # the barrier keeps XLA from sharing the forward pass's sigmoid (which would keep it alive)
    gate, up = jax.lax.optimization_barrier(residuals)
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    d_gate = g * up * (sig + silu * (1 - sig))
    return d_gate.astype(gate.dtype), (g * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """The exact GELU as ``torch.nn.functional.gelu`` computes it, ``x * 0.5 * (1 + erf(x / sqrt 2))``
    (transformers' ``"gelu"``), keeping only ``x`` for the backward pass.

    ``jax.nn.gelu(x, approximate=False)`` is the same function written with ``erfc``, which XLA:CPU
    expands into an exponential and a select chain: on the MiniLM fine-tune's ``[320, 1536]``
    activations the ``erf`` form's forward pass takes 0.19 ms against 0.51 (2-core AVX2 host).

    >>> x = jnp.array([-2.0, 0.0, 1.5])
    >>> bool(jnp.allclose(gelu(x), jax.nn.gelu(x, approximate=False)))
    True
    """
    return x * (0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF)))


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    # d/dx x Phi(x) = Phi(x) + x phi(x), recomputed from x
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
    return ((g * (cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
