"""The model's softmax, SwiGLU, exact GELU and RMSNorm: JAX's values and gradients, from fewer
saved arrays.

Oracle: autodiff of the textbook functions (``jax.nn.softmax``, ``jax.nn.silu(g) * u``,
``nnx.RMSNorm``; for the GELU, torch's own and its autograd). The residual checks use
``jax.ad_checkpoint.print_saved_residuals``: what a backward pass keeps, which is what these
functions exist to shrink.
"""

import contextlib
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from peftjax.nn._functional import gelu, softmax, swiglu
from peftjax.nn._norm import RMSNorm, rms_norm


def _rand(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), dtype)


def _big(f, *args, min_size):
    """The saved residuals of ``f`` with at least ``min_size`` elements (not the arguments), as
    ``jax.ad_checkpoint.print_saved_residuals`` lists them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    found = []
    for line in out.getvalue().splitlines():
        shape = re.match(r"\w+\[([\d,]*)\]", line)
        size = math.prod(int(d) for d in shape.group(1).split(",") if d) if shape else 0
        if size >= min_size and "from the argument" not in line:
            found.append(line)
    return found


def test_softmax_equals_jax_and_keeps_only_its_output():
    x = _rand((2, 3, 8, 8), 0).at[..., -2:].set(jnp.finfo(jnp.float32).min)  # masked keys, as attention's
    w = _rand((2, 3, 8, 8), 1)
    np.testing.assert_array_equal(softmax(x), jax.nn.softmax(x))
    ours = jax.grad(lambda x: jnp.sum(softmax(x) * w))(x)
    ref = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) * w))(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    mask = jnp.tril(jnp.ones((8, 8), bool))  # as attention uses it: masked scores, then probs @ values
    f = lambda x: jnp.sum(softmax(jnp.where(mask, x * 2.0, -1e30)) @ x)  # noqa: E731
    g = lambda x: jnp.sum(jax.nn.softmax(jnp.where(mask, x * 2.0, -1e30)) @ x)  # noqa: E731
    ours, ref = _big(f, x, min_size=x.size), _big(g, x, min_size=x.size)
    assert len(ours) < len(ref) and not any(" exp " in r or " div " in r for r in ours), (ours, ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_equals_silu_times_up_and_keeps_only_its_inputs(dtype):
    g, u, w = _rand((4, 16), 2, dtype), _rand((4, 16), 3, dtype), _rand((4, 16), 4, dtype)
    np.testing.assert_array_equal(swiglu(g, u), jax.nn.silu(g) * u)
    ours = jax.grad(lambda g, u: jnp.sum((swiglu(g, u) * w).astype(jnp.float32)), argnums=(0, 1))(g, u)
    ref = jax.grad(lambda g, u: jnp.sum((jax.nn.silu(g) * u * w).astype(jnp.float32)), argnums=(0, 1))(g, u)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    f = lambda g, u: jnp.sum(swiglu(g * 2, u * 3))  # noqa: E731
    r = lambda g, u: jnp.sum(jax.nn.silu(g * 2) * (u * 3))  # noqa: E731
    assert len(_big(f, g, u, min_size=g.size)) == 2 < len(_big(r, g, u, min_size=g.size))


def test_exact_gelu_equals_torchs_in_value_and_gradient_and_keeps_only_its_input():
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-12, 12, 2001), np.random.RandomState(5).standard_normal(999) * 3])
    x = x.astype(np.float32).reshape(3, 1000)
    w = _rand((3, 1000), 6)
    xt = torch.tensor(x, requires_grad=True)
    (torch.nn.functional.gelu(xt) * torch.tensor(np.asarray(w))).sum().backward()
    np.testing.assert_allclose(gelu(jnp.asarray(x)), torch.nn.functional.gelu(torch.tensor(x)).numpy(),
                               rtol=0, atol=2e-6)
    ours = jax.grad(lambda x: jnp.sum(gelu(x) * w))(jnp.asarray(x))
    np.testing.assert_allclose(ours, xt.grad.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(gelu(jnp.asarray(x)), jax.nn.gelu(jnp.asarray(x), approximate=False), atol=2e-6)
    f = lambda x: jnp.sum(gelu(x * 2.0))  # noqa: E731
    r = lambda x: jnp.sum(0.5 * (x * 2.0) * (1 + jax.lax.erf(x * 2.0 / np.sqrt(2))))  # noqa: E731
    xs = jnp.asarray(x)
    assert len(_big(f, xs, min_size=x.size)) == 1 < len(_big(r, xs, min_size=x.size))
    assert gelu(xs.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_equals_nnx_rmsnorm_in_value_and_gradient(dtype):
    x, w = _rand((3, 5, 32), 5, dtype), _rand((3, 5, 32), 6)
    ref_norm = nnx.RMSNorm(32, epsilon=1e-5, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    ours_norm = RMSNorm(32, epsilon=1e-5, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    scale = 1 + 0.1 * _rand((32,), 7, dtype)
    ref_norm.scale.set_value(scale)
    ours_norm.scale.set_value(scale)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    a, b = ours_norm(x), ref_norm(x)
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)

    def loss(norm, x):
        return jnp.sum(norm(x).astype(jnp.float32) * w)

    (g_ours, dx_ours) = nnx.grad(loss, argnums=(0, 1))(ours_norm, x)
    (g_ref, dx_ref) = nnx.grad(loss, argnums=(0, 1))(ref_norm, x)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(dx_ours, np.float32), np.asarray(dx_ref, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(g_ours.scale.get_value(), np.float32),
                               np.asarray(g_ref.scale.get_value(), np.float32), rtol=tol, atol=tol * 10)
    f = lambda x: jnp.sum(rms_norm(x * 2, scale, 1e-5) * w)  # noqa: E731
    r = lambda x: jnp.sum(ref_norm(x * 2) * w)  # noqa: E731
    assert len(_big(f, x, min_size=x.size)) < len(_big(r, x, min_size=x.size))


def test_rms_norm_falls_back_to_nnx_for_a_mask():
    norm = RMSNorm(8, rngs=nnx.Rngs(0))
    x, mask = _rand((2, 8), 8), jnp.array([[True] * 6 + [False] * 2] * 2)
    ref = nnx.RMSNorm(8, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(norm(x, mask=mask), ref(x, mask=mask))
