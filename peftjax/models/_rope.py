"""Rotary position embeddings as transformers computes them (``rotate_half`` layout)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_parameters(config) -> dict:
    """The RoPE settings of a config, for transformers 5 (``rope_parameters``) and 4 (``rope_scaling``).

    As transformers' ``standardize_rope_params``: ``rope_theta`` and ``partial_rotary_factor`` move
    in from the top level, and the scalings that need it get ``original_max_position_embeddings``
    (Phi-3's top-level field first). Phi-3 also reads a missing factor as 1.0 and its legacy
    ``"su"``/``"yarn"`` as ``"longrope"``.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    phi3 = getattr(config, "model_type", None) == "phi3"
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is None and phi3:
        partial = 1.0
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if phi3 and params["rope_type"] in ("su", "yarn"):
        params["rope_type"] = "longrope"
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        original = getattr(config, "original_max_position_embeddings", None)
        if original is not None:
            params["original_max_position_embeddings"] = original
        else:
            params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inv_frequencies(config, head_dim: int) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with linear or llama3 scaling."""
    p = rope_parameters(config)
    dim = int(head_dim * p.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    inv = 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    kind = p["rope_type"]
    if kind == "default":
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / p["factor"]).astype(np.float32)
    if kind == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {kind!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")


def rotary_cos_sin(inv_freq: np.ndarray, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``cos`` and ``sin`` of shape ``[batch, seq, head_dim]`` for integer ``position_ids``."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` (only the first ``cos.shape[-1]`` dims)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
