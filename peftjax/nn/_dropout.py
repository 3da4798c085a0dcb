"""Dropout on the adapter branch, driven by an explicit key.

Adapter layers sit deep inside a user's model, whose call signature peftjax does not control, so
the key reaches them through a context manager that is active while the forward is traced:

    with peftjax.dropout_key(key):
        loss = loss_fn(model, batch)

Each layer folds in a hash of its own path, so layers draw independent masks. Without an active
key (evaluation), dropout is the identity, like PyTorch's ``eval()``.

Every dropout mask in peftjax (adapters and the bundled models) comes from :func:`keep_mask`: a
counter-based hash of each element's index keyed by the key's words; each layer's and each site's
key comes from :func:`fold_key`, two multiply-adds per word. Both are element-wise integer
arithmetic, so XLA fuses a mask into the ops that use it and compiles no random-bits loop. With
``jax.random.bernoulli`` and ``fold_in`` (threefry, which XLA:CPU compiles as a loop per call) the
MiniLM fine-tune's masks took 30 ms of each step, and dropout doubled its compile time (see
benchmarks/README.md). The masks are statistically what ``torch.nn.Dropout``'s are (tested: rate,
independence across elements, sites and steps), though not the same bits, as no two frameworks'
random streams are.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_state = threading.local()


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
    """Enables adapter dropout with ``key`` inside the block (``None`` disables it)."""
    previous = getattr(_state, "key", None)
    _state.key = key
    try:
        yield
    finally:
        _state.key = previous


def apply_dropout(x: jax.Array, rate: float, path: str) -> jax.Array:
    """Inverted dropout of ``x`` with the active key folded with ``path``; identity without a key."""
    key = getattr(_state, "key", None)
    if key is None or rate <= 0.0:
        return x
    key = fold_key(key, zlib.crc32(path.encode()))
    return jnp.where(keep_mask(key, x.shape, 1.0 - rate), x / (1.0 - rate), jnp.zeros_like(x))


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit flips about
    half of the output bits (on a JAX or a NumPy uint32 array, with the same result).

    On JAX arrays it is written in ``lax`` primitives: ``jnp``'s operators each trace as a nested
    jitted function, and a train step traces dozens of masks."""
    h = _xorshift(h, 16)
    h = _mul(h, 0x85EBCA6B)
    h = _xorshift(h, 13)
    h = _mul(h, 0xC2B2AE35)
    return _xorshift(h, 16)


def _xorshift(h, bits: int):
    if isinstance(h, (np.ndarray, np.generic)):
        return h ^ (h >> np.uint32(bits))
    return lax.bitwise_xor(h, lax.shift_right_logical(h, np.uint32(bits)))


def _mul(h, factor: int):
    return h * np.uint32(factor) if isinstance(h, (np.ndarray, np.generic)) else lax.mul(h, np.uint32(factor))


def _key_words(key: jax.Array) -> tuple[jax.Array, Any]:
    """A key's uint32 words (last axis) and its implementation (``None`` for a raw ``uint32`` key)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), jax.random.key_impl(key)
    if key.dtype != jnp.uint32 or key.ndim < 1 or key.shape[-1] < 2:
        raise TypeError(f"expected a jax.random key (jax.random.key or PRNGKey), got {key.dtype}{list(key.shape)}")
    return key, None


_FOLD_MULTIPLIER = 0x5851F42D  # odd: w -> w * m + c is a bijection of uint32


def fold_key(key: jax.Array, data) -> jax.Array:
    """A new key from ``key`` and the integer ``data`` (Python or traced), for the same purpose as
    ``jax.random.fold_in``: keys folded with different data draw unrelated masks.

    Each word goes through ``w * m + c`` (chained, so every word depends on the ones before), with
    ``c`` a hash of ``data``: computed in NumPy when ``data`` is static (a layer's path, a split
    index), so a fold costs two multiply-adds in the compiled step, and equal to the traced
    computation (a scanned layer index), so scanned and unrolled layers draw the same masks. The
    mixing that makes masks look independent happens in :func:`keep_mask`, whose hash takes the
    final words. Cheap folds matter: XLA copies a key's whole derivation into every fusion that
    uses its mask.
    """
    words, impl = _key_words(key)
    n = words.shape[-1]
    if isinstance(data, (int, np.integer)):  # folded in NumPy: constants in the compiled step
        data = np.asarray(int(data) & 0xFFFFFFFF, np.uint32)
    else:
        data = jnp.asarray(data).astype(jnp.uint32)
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as in XLA
        c = _fmix32(data * np.uint32(0x9E3779B1) + np.uint32(0x632BE5AB))
        consts = [c ^ np.uint32(0x5BD1E995 * (i + 1) & 0xFFFFFFFF) for i in range(n)]
    out, prev = [], None
    for i in range(n):  # lax, not jnp operators: cheaper to trace (see _fmix32)
        w = lax.index_in_dim(words, i, axis=words.ndim - 1, keepdims=True)
        prev = lax.add(lax.mul(w if prev is None else lax.bitwise_xor(w, prev), np.uint32(_FOLD_MULTIPLIER)),
                       lax.convert_element_type(consts[i], jnp.uint32))
        out.append(prev)
    new = lax.concatenate(out, words.ndim - 1)
    return new if impl is None else jax.random.wrap_key_data(new, impl=impl)


def split_keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """``n`` distinct keys from ``key`` (:func:`fold_key` with ``2**31 + i``, apart from the layer
    indices :func:`layer_key` folds), or ``n`` times ``None`` without a key."""
    return [None] * n if key is None else [fold_key(key, 2**31 + i) for i in range(n)]


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
    """A boolean mask of ``shape``, each element ``True`` with probability ``keep_prob``.

    The mask is a function of ``key`` and the element's position only (the same key gives the
    same mask, in or out of ``jit``): each element hashes its flat index with the key's words
    (two rounds of :func:`_fmix32`, each a bijection, so the elements of one mask get distinct
    32-bit values) and compares the result with ``keep_prob * 2**32``.
    """
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    threshold = int(round(keep_prob * 2.0**32))
    if threshold <= 0 or threshold >= 2**32:
        return jnp.full(shape, threshold > 0)
    if size >= 2**32:  # the flat index would wrap: the library's own generator instead
        return jax.random.bernoulli(key, keep_prob, shape)
    words, _ = _key_words(key)
    seed = [lax.index_in_dim(words, i, axis=words.ndim - 1, keepdims=False) for i in range(words.shape[-1])]
    seed0, seed1 = seed[0], seed[1]
    for word in seed[2:]:  # wider keys (rbg) fold their other words in
        seed0, seed1 = seed1, _fmix32(lax.bitwise_xor(seed0, word))
    index = lax.reshape(lax.iota(jnp.uint32, size), shape)
    h = _fmix32(lax.bitwise_xor(lax.mul(index, np.uint32(0x9E3779B1)), seed0))
    h = _fmix32(lax.bitwise_xor(h, seed1))
    return lax.lt(h, np.uint32(threshold))


def active_dropout_key() -> jax.Array | None:
    """The key set by the innermost :func:`dropout_key` block (``None`` outside one)."""
    return getattr(_state, "key", None)


def layer_key(key: jax.Array | None, index) -> jax.Array | None:
    """Layer ``index``'s key from a stack's ``key`` (``None`` without one): the same whether the
    layers loop or scan, so a stacked and an unstacked model draw the same dropout masks."""
    return None if key is None else fold_key(key, index)


def own_loss(model, batch) -> jax.Array:
    """The model's own loss: ``model(**batch).loss`` (the batch carries ``labels``).

    Under a dropout key (:func:`dropout_key`), a model that takes ``dropout_rng`` (the bundled
    ones) gets one derived from it, so its own dropout runs as in transformers' ``.train()`` mode.
    """
    key = active_dropout_key()
    if key is not None and "dropout_rng" in inspect.signature(type(model).__call__).parameters:
        return model(**batch, dropout_rng=fold_key(key, 1)).loss
    return model(**batch).loss
