"""Keys formed on the host, so that adding adapters, and a training loop's per-step keys, compile
no XLA program.

Each eager ``jax.random`` call (``key``, ``fold_in``, ``split``, ``uniform`` per shape) compiles a
small XLA program the first time it runs: on a 2-core host ``get_peft_model`` spent about 0.5 s
(11 programs) and 70 MiB of compiler heap before the first training step. The plain inits need
none of it. A key's words are read on the host (``key_data``, no compilation), each layer's share is
``(words, layer index)``, and the draws are NumPy's; only inits that run JAX algebra on the layer
(orthogonal, PiSSA's randomized SVD) ask for a JAX key, folded in as before. The Trainer's keys,
``fold_in(key(seed), micro_step)``, are JAX's threefry computed in NumPy (:func:`fold_in`).
"""

from __future__ import annotations

import jax
import numpy as np


def seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed, impl="threefry2x32")`` for ``0 <= seed < 2**32``, built from its two
    words instead of by the compiled seeding program."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed_key: seed must be in [0, 2**32), got {seed}")
    return jax.random.wrap_key_data(np.array([0, seed], np.uint32), impl="threefry2x32")


def default_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)``: formed on the host (:func:`seed_key`) where that is the same key
    (JAX's default threefry implementation, ``0 <= seed < 2**32``), otherwise by JAX."""
    if jax.config.jax_default_prng_impl == "threefry2x32" and 0 <= seed < 2**32:
        return seed_key(seed)
    return jax.random.key(seed)


def _rotl(x: np.uint32, r: int) -> np.uint32:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def _threefry2x32(k0, k1, x0, x1) -> tuple[np.uint32, np.uint32]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011) on one pair of words, as JAX computes it."""
    with np.errstate(over="ignore"):  # uint32 arithmetic wraps
        k0, k1, x0, x1 = (np.uint32(v) for v in (k0, k1, x0, x1))
        ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
        rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
        x0, x1 = x0 + ks[0], x1 + ks[1]
        for i in range(5):
            for r in rotations[i % 2]:
                x0 = x0 + x1
                x1 = _rotl(x1, r) ^ x0
            x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def fold_in(key: jax.Array, data: int) -> jax.Array:
    """``jax.random.fold_in(key, data)`` for a concrete key: computed on the host for a threefry
    key (no XLA program; a training loop folds the step into its key every step), by JAX otherwise."""
    if (not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or key.shape
            or str(jax.random.key_impl(key)) != "threefry2x32" or not 0 <= data < 2**32):
        return jax.random.fold_in(key, data)
    k0, k1 = key_words(key)
    return jax.random.wrap_key_data(np.array(_threefry2x32(k0, k1, 0, data), np.uint32), impl="threefry2x32")


def key_words(key: jax.Array) -> np.ndarray:
    """A PRNG key's words as host ``uint32``: a typed key's data, or a raw ``PRNGKey`` array."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).astype(np.uint32).ravel()


class LayerKey:
    """One layer's share of an injection's key: ``fold_in(key, index)``, formed only when asked.

    ``host_rng`` seeds a NumPy generator from the key's words and the index (distinct per layer,
    the same every run); ``jax_key`` folds the index in with JAX for the inits that need a key.
    """

    def __init__(self, key: jax.Array, index: int):
        self.key, self.index = key, index

    def __repr__(self) -> str:
        return f"LayerKey(words={key_words(self.key).tolist()}, index={self.index})"


def jax_key(key) -> jax.Array:
    """A JAX key from a :class:`LayerKey` (folded in now) or a JAX key (as is)."""
    return jax.random.fold_in(key.key, key.index) if isinstance(key, LayerKey) else key


def host_rng(key) -> np.random.Generator:
    """A NumPy generator seeded from a :class:`LayerKey` or a concrete JAX key, compiling nothing."""
    if isinstance(key, LayerKey):
        return np.random.default_rng([*key_words(key.key).tolist(), key.index])
    return np.random.default_rng(key_words(key).tolist())


def sampler(key) -> "HostSampler | JaxSampler":
    """Float32 draws from ``key``: on the host (NumPy) for a concrete key, with JAX for one that is
    traced (an init running under ``jit`` or ``vmap``, as Linen's does)."""
    raw = key.key if isinstance(key, LayerKey) else key
    if isinstance(raw, jax.core.Tracer):
        return JaxSampler(jax_key(key))
    return HostSampler(host_rng(key))


class HostSampler:
    """Draws as NumPy ``float32`` arrays."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def uniform(self, shape, low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, shape).astype(np.float32)

    def normal(self, shape) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32)

    @staticmethod
    def zeros(shape) -> np.ndarray:
        return np.zeros(shape, np.float32)


class JaxSampler:
    """Draws as JAX ``float32`` arrays, each from a fresh split of the key."""

    def __init__(self, key: jax.Array):
        self.key = key

    def _next(self) -> jax.Array:
        self.key, key = jax.random.split(self.key)
        return key

    def uniform(self, shape, low: float, high: float) -> jax.Array:
        return jax.random.uniform(self._next(), shape, np.float32, low, high)

    def normal(self, shape) -> jax.Array:
        return jax.random.normal(self._next(), shape, np.float32)

    @staticmethod
    def zeros(shape) -> jax.Array:
        return jax.numpy.zeros(shape, np.float32)
