"""Activation functions whose gradients keep only what the backward pass needs.

Autodiff of a composite function saves every intermediate its derivative touches. For the two
element-wise blocks of a transformer layer that is far more than necessary, and in a LoRA step
(frozen weights: no weight gradients, activations dominate memory) it is a large share of the
step's buffers:

- ``jax.nn.softmax`` (without ``jax_softmax_custom_jvp``) keeps its masked input and its
  un-normalised exponentials as well as its output: three ``[batch, heads, q, k]`` arrays per
  layer where the output alone determines the derivative;
- ``silu(gate) * up`` keeps ``sigmoid(gate)`` and ``silu(gate)`` beside ``gate`` and ``up``: four
  ``[tokens, intermediate]`` arrays where two suffice, the sigmoid being cheap to recompute.

The functions here compute the same values with the same operations, and define their derivatives
from the minimal residuals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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
