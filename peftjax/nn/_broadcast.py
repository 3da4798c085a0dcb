"""Explicit broadcasting: a per-feature vector shaped to the array it meets.

peftjax never relies on NumPy's implicit rank promotion (the test suite runs with
``jax_numpy_rank_promotion="raise"``): an ``[out]`` vector meeting a ``[batch, seq, out]`` array is
reshaped to ``[1, 1, out]`` first, so a vector of the wrong length or axis fails loudly.
"""

from __future__ import annotations

import jax


def along_last(v: jax.Array, ndim: int) -> jax.Array:
    """``v`` (its axes the trailing axes of an ``ndim``-d array) with leading axes of size 1."""
    return v.reshape((1,) * (ndim - v.ndim) + v.shape)
