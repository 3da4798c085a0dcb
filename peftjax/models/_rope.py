"""Rotary position embeddings as transformers computes them (``rotate_half`` layout)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

# transformers' ``default_theta`` where a family's differs from 10000
DEFAULT_THETA = {"mixtral": 1000000.0, "smollm3": 2000000.0, "gpt_oss": 150000.0, "ernie4_5": 500000.0,
                 "llama4_text": 500000.0, "cohere": 500000.0, "helium": 100000.0, "lfm2": 1000000.0,
                 "ernie4_5_moe": 500000.0, "phimoe": 1000000.0, "flex_olmo": 500000.0}


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
    params.setdefault("rope_theta", getattr(config, "rope_theta", DEFAULT_THETA.get(getattr(config, "model_type", None),
                                                                                    10000.0)))
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


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def _required(p: dict, kind: str, *names: str) -> list:
    missing = [n for n in names if p.get(n) is None]
    if missing:
        raise ValueError(f"rope_type {kind!r} needs {missing} in rope_parameters; found {sorted(p)}")
    return [p[n] for n in names]


def _default_inv(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))


def _yarn(p: dict, dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    """transformers' ``_compute_yarn_parameters``: NTK-by-parts interpolation and its attention factor."""
    base, old = p["rope_theta"], p["original_max_position_embeddings"]
    factor = p.get("factor") or max_positions / old

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolate = (1 - ramp).astype(np.float32)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv.astype(np.float32), float(attention)


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
    """A model's rotary embedding as static, hashable data (it lives in the NNX graph definition).

    ``kind`` says how the frequencies depend on the call, as transformers' ``dynamic_rope_update``:
    ``"static"`` not at all; ``"longrope"`` uses ``long_inv_freq`` when the call's largest position
    + 1 exceeds ``threshold`` (``original_max_position_embeddings``), ``inv_freq`` (the short
    factors) otherwise, and multiplies cos and sin by ``long_scaling`` instead of ``scaling`` there
    when that is set (PhiMoE's ``long_mscale``); ``"dynamic"`` raises the base for a call whose
    largest position + 1 exceeds ``threshold`` (``max_position_embeddings``). ``scaling``
    multiplies cos and sin (YaRN's and LongRoPE's attention factor).

    Dynamic NTK is stateless here. transformers' rotary module keeps the frequencies of the longest
    call so far (``max_seq_len_cached``): a later call whose length lies between
    ``max_position_embeddings`` and that maximum reuses the grown frequencies instead of its own
    (a call shorter than the threshold resets them). Here every call uses its own length, which
    is what a fresh transformers model computes for every call, and what transformers' ``generate``
    computes within one generation (its lengths only grow). Only a call after a longer one on the
    same torch model differs.
    """

    inv_freq: tuple[float, ...]
    scaling: float = 1.0
    kind: str = "static"
    long_inv_freq: tuple[float, ...] = ()
    threshold: int = 0
    base: float = 0.0  # dynamic: rope_theta, factor, rotary dims
    factor: float = 1.0
    dim: int = 0
    long_scaling: float | None = None  # longrope: the scaling past ``threshold`` (None: ``scaling``)

    def cos_sin(self, position_ids, dtype) -> tuple[jax.Array, jax.Array]:
        """``cos`` and ``sin`` of shape ``[batch, seq, rotary dims]`` for integer ``position_ids``.

        ``position_ids`` known while tracing (a NumPy array: what
        :func:`peftjax.models._attention.decoder_positions` gives a call without ``position_ids`` or
        a cache) gives cos and sin computed with NumPy, constants of the compiled program (one
        row's when the rows are equal, broadcast to the batch). From traced positions XLA computes
        them inside each fusion that reads them: once per head, in every layer, and again in the
        backward pass (65 ms of the speed benchmark's 1.3 s step).
        """
        if isinstance(position_ids, np.ndarray):
            rows = position_ids[:1] if (position_ids == position_ids[:1]).all() else position_ids
            if rows.size * len(self.inv_freq) <= _HOST_ROPE_LIMIT:
                cos, sin = self._cos_sin(rows, np, int(rows.max()) + 1 if rows.size else 0)
                shape = (*position_ids.shape, cos.shape[-1])
                return (jnp.broadcast_to(jnp.asarray(cos.astype(dtype)), shape),
                        jnp.broadcast_to(jnp.asarray(sin.astype(dtype)), shape))
        position_ids = jnp.asarray(position_ids)
        cos, sin = self._cos_sin(position_ids, jnp, jnp.max(position_ids) + 1 if self.kind != "static" else None)
        return cos.astype(dtype), sin.astype(dtype)

    def _cos_sin(self, position_ids, xp, seq_len):
        """The formula for NumPy or ``jax.numpy`` (``xp``); ``seq_len``: the largest position + 1."""
        inv = xp.asarray(self.inv_freq, xp.float32)
        scaling = xp.float32(self.scaling)
        if self.kind == "longrope":
            inv = xp.where(seq_len > self.threshold, xp.asarray(self.long_inv_freq, xp.float32), inv)
            if self.long_scaling is not None:
                scaling = xp.where(seq_len > self.threshold, xp.float32(self.long_scaling), scaling)
        elif self.kind == "dynamic":  # dynamic NTK
            seq = xp.asarray(xp.maximum(seq_len, self.threshold), xp.float32)
            base = self.base * ((self.factor * seq / self.threshold) - (self.factor - 1)) ** (
                self.dim / (self.dim - 2))
            grown = 1.0 / (base ** (xp.arange(0, self.dim, 2, dtype=xp.float32) / self.dim))
            inv = xp.where(seq_len > self.threshold, grown, inv)
        freqs = position_ids.astype(xp.float32)[..., None] * inv[None, None, :]
        emb = xp.concatenate([freqs, freqs], axis=-1)
        return xp.cos(emb) * scaling, xp.sin(emb) * scaling


# the most positions x frequencies computed on the host: cos and sin then are [seq, 2 x frequencies]
# float32 constants of at most 8 MiB each (a 16k-token call of 64 frequencies); longer calls trace them
_HOST_ROPE_LIMIT = 1 << 20


def rotary_embedding(config, head_dim: int) -> RotaryEmbedding:
    """The config's RoPE (any of :data:`SUPPORTED_ROPE_TYPES`), as transformers computes it.

    Raises:
      ValueError: an unsupported ``rope_type`` (the supported ones listed), or a scaling without the
        fields it needs (named).
    """
    p = rope_parameters(config)
    kind = p["rope_type"]
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    if kind in ("default", "linear", "llama3"):
        return RotaryEmbedding(tuple(inv_frequencies(config, head_dim).tolist()))
    if kind == "yarn":
        _required(p, kind, "factor")
        inv, scaling = _yarn(p, dim, config.max_position_embeddings)
        return RotaryEmbedding(tuple(inv.tolist()), scaling)
    if kind == "dynamic" and p.get("alpha"):  # Hunyuan's fixed NTK alpha: a larger base, no dynamic update
        base = p["rope_theta"] * p["alpha"] ** (dim / (dim - 2))
        return RotaryEmbedding(tuple(_default_inv(base, dim).tolist()))
    if kind == "dynamic":
        (factor,) = _required(p, kind, "factor")
        inv = _default_inv(p["rope_theta"], dim)
        return RotaryEmbedding(tuple(inv.tolist()), kind="dynamic", threshold=int(config.max_position_embeddings),
                               base=float(p["rope_theta"]), factor=float(factor), dim=dim)
    if kind == "longrope":
        short, long = _required(p, kind, "short_factor", "long_factor")
        old = p["original_max_position_embeddings"]
        factor = p.get("factor") or config.max_position_embeddings / old
        scaling = p.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        shape = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        powers = p["rope_theta"] ** shape

        def inv(ext):
            ext = np.asarray(ext, np.float32)
            if ext.shape != powers.shape:
                raise ValueError(f"rope_parameters: longrope factors need {powers.shape[0]} entries, got {ext.shape[0]}")
            return tuple((1.0 / (ext * powers)).astype(np.float32).tolist())

        return RotaryEmbedding(inv(short), float(scaling), "longrope", inv(long), int(old))
    raise ValueError(f"rope_type {kind!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")


def inv_frequencies(config, head_dim: int) -> np.ndarray:
    """Inverse frequencies ``[rotary dims // 2]`` (float32) of the default, linear and llama3 RoPE."""
    p = rope_parameters(config)
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    inv = _default_inv(p["rope_theta"], dim)
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
    raise ValueError(f"rope_type {kind!r} has no fixed frequencies here; use rotary_embedding")


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` (only the first ``cos.shape[-1]`` dims)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
