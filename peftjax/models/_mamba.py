"""Mamba's (Mamba-1's) mixer, as transformers holds it (``MambaMixer``; ``FalconMambaMixer``;
``JambaMambaMixer``).

``in_proj`` gives ``x`` and the gate ``z`` (``intermediate_size`` each, in that order); ``x`` goes
through a causal depthwise ``conv1d`` (a bias with ``use_conv_bias``) and SiLU; ``x_proj`` gives
the time step's low-rank input (``time_step_rank``), ``B`` and ``C`` (``state_size`` each); the
time steps are ``softplus(dt_proj(...))``, the decay ``A = -exp(A_log)`` (``[intermediate_size,
state_size]``); the selective scan (:func:`peftjax.nn._selective_scan.selective_scan`) plus
``D x``, times ``silu(z)``, goes through ``out_proj``. Falcon-Mamba RMS-normalises the time step's
input, ``B`` and ``C`` without weights (``mixer_rms_eps``) first, Jamba with weights
(``dt_layernorm``, ``b_layernorm``, ``c_layernorm``). Padded tokens are zeroed before
``in_proj`` and after the convolution, as transformers' ``apply_mask_to_padding_states``.

transformers multiplies by ``dt_proj.weight`` itself (not through the module), so PEFT's LoRA on
``dt_proj`` changes nothing in its forward pass; ``peftjax.config`` refuses that target for these
families rather than compute something PEFT does not.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._lfm2 import Lfm2Conv1d
from peftjax.nn._norm import RMSNorm
from peftjax.nn._selective_scan import selective_scan


def _weightless_rms(x, eps: float):
    h = x.astype(jnp.float32)
    return (h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class MambaMixer(nnx.Module):
    """The Mamba mixer (see the module's docstring). Its cache: ``{"conv" [batch, kernel - 1,
    intermediate_size], "ssm" [batch, intermediate_size, state_size]}`` (the state in float32)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"A_log": ("A_log", False), "D": ("D", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        if config.hidden_act != "silu":
            raise ValueError(f"{config.model_type}: hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
        layout = mamba_layout(config)
        inner, self.state_size, self.rank = layout.width, layout.state_size, layout.rank
        self.rms_eps = float(config.mixer_rms_eps) if config.model_type == "falcon_mamba" else None
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = nnx.Linear(config.hidden_size, 2 * inner, use_bias=layout.proj_bias, **kw)
        self.conv1d = Lfm2Conv1d(inner, layout.conv_kernel, use_bias=layout.conv_bias, param_dtype=param_dtype,
                                 init_std=config.initializer_range, rngs=rngs)
        self.x_proj = nnx.Linear(inner, self.rank + 2 * self.state_size, use_bias=False, **kw)
        self.weighted_norms = config.model_type == "jamba"
        if self.weighted_norms:  # Jamba's RMSNorms of the time step's input, B and C
            norm = dict(epsilon=config.rms_norm_eps, **kw)
            self.dt_layernorm = RMSNorm(self.rank, **norm)
            self.b_layernorm = RMSNorm(self.state_size, **norm)
            self.c_layernorm = RMSNorm(self.state_size, **norm)
        self.dt_proj = nnx.Linear(self.rank, inner, use_bias=True, **kw)
        a = jnp.broadcast_to(jnp.arange(1, self.state_size + 1, dtype=jnp.float32), (inner, self.state_size))
        self.A_log = nnx.Param(jnp.log(a).astype(param_dtype))  # transformers' initialisation
        self.D = nnx.Param(jnp.ones((inner,), param_dtype))
        self.out_proj = nnx.Linear(inner, config.hidden_size, use_bias=layout.proj_bias, **kw)

    def __call__(self, x, token_mask=None, cache=None, segment_ids=None):
        """``token_mask``: ``[batch, seq]``, 0 on padding (``None``: none); ``cache``: ``{"conv",
        "ssm"}`` or ``None``; ``segment_ids``: packed rows, each sequence convolved and scanned from
        zeros. Returns ``(out, the new cache or None)``."""
        dtype = x.dtype
        mask = None if token_mask is None else token_mask[..., None].astype(dtype)
        if mask is not None:
            x = x * mask
        hidden, gate = jnp.split(self.in_proj(x), 2, axis=-1)
        hidden, conv_state = self.conv1d(hidden, None if cache is None else cache["conv"], segment_ids)
        hidden = jax.nn.silu(hidden)
        if mask is not None:
            hidden = hidden * mask
        step, B, C = jnp.split(self.x_proj(hidden), [self.rank, self.rank + self.state_size], axis=-1)
        if self.rms_eps is not None:  # Falcon-Mamba
            step, B, C = (_weightless_rms(t, self.rms_eps) for t in (step, B, C))
        elif self.weighted_norms:
            step, B, C = self.dt_layernorm(step), self.b_layernorm(B), self.c_layernorm(C)
        dt = jax.nn.softplus(self.dt_proj(step).astype(jnp.float32))
        A = -jnp.exp(self.A_log.get_value().astype(jnp.float32))
        y, state = selective_scan(hidden, dt, A, B, C, None if cache is None else cache["ssm"], segment_ids)
        y = y + self.D.get_value().astype(jnp.float32)[None, None, :] * hidden.astype(jnp.float32)
        out = self.out_proj((y * jax.nn.silu(gate.astype(jnp.float32))).astype(dtype))
        new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype), "ssm": state}
        return out, new_cache


class MambaLayout(NamedTuple):
    """A Mamba mixer's sizes and options, whatever its family's config calls them."""

    width: int
    state_size: int
    rank: int
    conv_kernel: int
    conv_bias: bool
    proj_bias: bool


def mamba_layout(config) -> MambaLayout:
    """Mamba's and Falcon-Mamba's fields (``expand``, ``state_size``, ``time_step_rank``,
    ``conv_kernel``, ``use_conv_bias``, ``use_bias``) or Jamba's (``mamba_expand``,
    ``mamba_d_state``, ``mamba_dt_rank``, ``mamba_d_conv``, ``mamba_conv_bias``, ``mamba_proj_bias``);
    the rank as the config derives it (``"auto"``: ``ceil(hidden_size / 16)``)."""
    if config.model_type == "jamba":
        return MambaLayout(int(config.mamba_expand * config.hidden_size), config.mamba_d_state,
                           int(config.mamba_dt_rank), config.mamba_d_conv, bool(config.mamba_conv_bias),
                           bool(config.mamba_proj_bias))
    return MambaLayout(int(config.expand * config.hidden_size), config.state_size, int(config.time_step_rank),
                       config.conv_kernel, bool(config.use_conv_bias), bool(config.use_bias))


def mamba_cache(config, batch: int, dtype) -> dict[str, jax.Array]:
    """An empty Mamba layer cache (see :class:`MambaMixer`)."""
    layout = mamba_layout(config)
    return {"conv": jnp.zeros((batch, layout.conv_kernel - 1, layout.width), dtype),
            "ssm": jnp.zeros((batch, layout.width, layout.state_size), np.float32)}
