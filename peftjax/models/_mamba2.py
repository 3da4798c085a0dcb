"""Mamba-2's mixer, as transformers' hybrids hold it (``BambaMixer``: Granite 4.0's ``mamba`` layers).

``in_proj`` gives the gate ``z``, the convolution's input ``xBC`` and the time steps ``dt`` (in that
order); ``xBC`` goes through a causal depthwise ``conv1d`` (a bias with ``mamba_conv_bias``) and
SiLU, then splits into ``x`` (``mamba_n_heads`` heads of ``mamba_d_head``) and ``B``, ``C``
(``mamba_n_groups`` groups of ``mamba_d_state``). The time steps are ``softplus(dt + dt_bias)``
clamped to ``time_step_limit``, the decay ``A = -exp(A_log)``; the selective scan
(:func:`peftjax.nn._ssd.ssd_scan`, by ``mamba_chunk_size`` chunks) plus ``D x`` goes through the
gated RMSNorm (``norm``: times ``silu(z)``, then normed per group) and ``out_proj``. Padded tokens
are zeroed before ``in_proj`` and after the convolution, as transformers' ``apply_mask_to_padding_states``.

transformers clamps the time steps on its chunked path only; its one-token decoding step does not.
Both paths clamp here: the same unless a checkpoint sets ``time_step_limit`` (the Granite 4.0
releases keep the default, no limit).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._lfm2 import Lfm2Conv1d
from peftjax.nn._ssd import ssd_scan


class GatedGroupRMSNorm(nnx.RMSNorm):
    """``norm``: ``x * silu(gate)``, RMS-normed within each of ``groups`` equal slices of the last
    axis, times ``weight``; in float32 (transformers' ``BambaRMSNormGated``)."""

    def __init__(self, features: int, groups: int, *, epsilon: float, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.groups = groups

    def __call__(self, x, gate):
        h = x.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
        grouped = h.reshape(*h.shape[:-1], self.groups, -1)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + self.epsilon)
        scale = self.scale.get_value().astype(jnp.float32)
        return grouped.reshape(h.shape) * scale.reshape((1,) * (h.ndim - 1) + (-1,))


class Mamba2Mixer(nnx.Module):
    """The Mamba-2 mixer (see the module's docstring). Its cache: ``{"conv" [batch, kernel - 1,
    conv channels], "ssm" [batch, heads, head_dim, state_size]}`` (the state in float32)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "dt_bias": ("dt_bias", False), "A_log": ("A_log", False), "D": ("D", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = config.mamba_n_heads, mamba_head_dim(config)
        self.n_groups, self.state_size = config.mamba_n_groups, config.mamba_d_state
        self.intermediate_size = int(config.mamba_expand * config.hidden_size)
        if self.num_heads * self.head_dim != self.intermediate_size or self.num_heads % self.n_groups:
            raise ValueError(f"{config.model_type}: mamba_n_heads ({self.num_heads}) x mamba_d_head ({self.head_dim}) "
                             f"must be mamba_expand x hidden_size ({self.intermediate_size}), and mamba_n_heads a "
                             f"multiple of mamba_n_groups ({self.n_groups})")
        self.chunk_size = int(config.mamba_chunk_size)
        limit = getattr(config, "time_step_limit", None) or (0.0, float("inf"))
        self.time_step_limit = (float(limit[0]), float(limit[1]))
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.state_size
        kw = dict(use_bias=bool(config.mamba_proj_bias), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = nnx.Linear(config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, **kw)
        self.conv1d = Lfm2Conv1d(self.conv_dim, config.mamba_d_conv, use_bias=bool(config.mamba_conv_bias),
                                 param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)
        # transformers' initialisation: A = 1..heads, D and dt_bias ones
        self.dt_bias = nnx.Param(jnp.ones((self.num_heads,), param_dtype))
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, self.num_heads + 1, dtype=jnp.float32)).astype(param_dtype))
        self.D = nnx.Param(jnp.ones((self.num_heads,), param_dtype))
        self.norm = GatedGroupRMSNorm(self.intermediate_size, self.n_groups, epsilon=config.rms_norm_eps, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        self.out_proj = nnx.Linear(self.intermediate_size, config.hidden_size, **kw)

    def __call__(self, x, token_mask=None, cache=None, segment_ids=None):
        """``token_mask``: ``[batch, seq]``, 0 on padding (``None``: none); ``cache``: ``{"conv",
        "ssm"}`` or ``None``; ``segment_ids``: packed rows, each sequence convolved and scanned from
        zeros. Returns ``(out, the new cache or None)``."""
        dtype = x.dtype
        mask = None if token_mask is None else token_mask[..., None].astype(dtype)
        if mask is not None:
            x = x * mask
        b, s, _ = x.shape
        z, xbc, dt = jnp.split(self.in_proj(x), [self.intermediate_size, self.intermediate_size + self.conv_dim],
                               axis=-1)
        xbc, conv_state = self.conv1d(xbc, None if cache is None else cache["conv"], segment_ids)
        xbc = jax.nn.silu(xbc)
        if mask is not None:
            xbc = xbc * mask
        groups = self.n_groups * self.state_size
        hidden, B, C = jnp.split(xbc, [self.intermediate_size, self.intermediate_size + groups], axis=-1)
        per_head = lambda p: p.get_value().astype(jnp.float32)  # noqa: E731
        dt = jax.nn.softplus(dt.astype(jnp.float32) + per_head(self.dt_bias)[None, None, :])
        low, high = self.time_step_limit
        if (low, high) != (0.0, float("inf")):
            dt = jnp.clip(dt, low, high)
        hidden = hidden.reshape(b, s, self.num_heads, self.head_dim)
        y, state = ssd_scan(hidden, dt, -jnp.exp(per_head(self.A_log)),
                            B.reshape(b, s, self.n_groups, self.state_size),
                            C.reshape(b, s, self.n_groups, self.state_size), self.chunk_size,
                            None if cache is None else cache["ssm"], segment_ids)
        y = y + per_head(self.D)[None, None, :, None] * hidden.astype(jnp.float32)
        out = self.out_proj(self.norm(y.reshape(b, s, -1), z).astype(dtype))
        new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype), "ssm": state}
        return out, new_cache


def mamba_head_dim(config) -> int:
    """``mamba_d_head``, or ``mamba_expand * hidden_size / mamba_n_heads`` where it says ``"auto"``."""
    d = config.mamba_d_head
    return int(config.mamba_expand * config.hidden_size) // config.mamba_n_heads if d == "auto" else int(d)


def mamba_cache(config, batch: int, dtype) -> dict[str, jax.Array]:
    """An empty Mamba-2 layer cache (see :class:`Mamba2Mixer`)."""
    inner = int(config.mamba_expand * config.hidden_size)
    conv = inner + 2 * config.mamba_n_groups * config.mamba_d_state
    return {"conv": jnp.zeros((batch, config.mamba_d_conv - 1, conv), dtype),
            "ssm": jnp.zeros((batch, config.mamba_n_heads, mamba_head_dim(config), config.mamba_d_state),
                             np.float32)}
