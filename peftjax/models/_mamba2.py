"""Mamba-2's mixer, as transformers' hybrids hold it (``BambaMixer``: Granite 4.0's ``mamba`` layers;
``NemotronHMamba2Mixer``: Nemotron-H's, the same computation under other config names).

``in_proj`` gives the gate ``z``, the convolution's input ``xBC`` and the time steps ``dt`` (in that
order); ``xBC`` goes through a causal depthwise ``conv1d`` (a bias with ``mamba_conv_bias``) and
SiLU, then splits into ``x`` (``mamba_n_heads`` heads of ``mamba_d_head``) and ``B``, ``C``
(``mamba_n_groups`` groups of ``mamba_d_state``). The time steps are ``softplus(dt + dt_bias)``
clamped to ``time_step_limit``, the decay ``A = -exp(A_log)``; the selective scan
(:func:`peftjax.nn._ssd.ssd_scan`, by ``mamba_chunk_size`` chunks) plus ``D x`` goes through the
gated RMSNorm (``norm``: times ``silu(z)``, then normed per group) and ``out_proj``. Padded tokens
are zeroed before ``in_proj`` and after the convolution, as transformers' ``apply_mask_to_padding_states``.

The time steps are clamped where transformers clamps them (as mamba_ssm's kernels): on the chunked
path (training, scoring, a prompt's prefill), not in a one-token decoding step. That differs only
where a limit is set: Zamba2's ``(time_step_min, inf)``, a Mamba-2 config's ``time_step_limit``.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

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


class Mamba2Layout(NamedTuple):
    """A Mamba-2 mixer's sizes and options, whatever its family's config calls them."""

    heads: int
    head_dim: int
    groups: int
    state_size: int
    conv_kernel: int
    conv_bias: bool
    proj_bias: bool
    chunk_size: int
    time_step_limit: tuple[float, float]
    epsilon: float
    out_bias: bool | None = None  # out_proj's bias where it differs from in_proj's (Falcon-H1's projectors_bias)

    @property
    def intermediate_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.groups * self.state_size


def mamba2_layout(config) -> Mamba2Layout:
    """The config's Mamba-2 layout, by family: Mamba-2's own fields (``num_heads``, ``head_dim``,
    ``state_size``, ``n_groups``, ``conv_kernel``, ``use_conv_bias``, ``use_bias``, ``chunk_size``,
    ``layer_norm_epsilon``; ``expand x hidden_size`` wide), Nemotron-H's (``mamba_num_heads``,
    ``mamba_head_dim``, ``ssm_state_size``, ``n_groups``, ``conv_kernel``, ``use_conv_bias``,
    ``use_bias``, ``chunk_size``, ``layer_norm_epsilon``) or Bamba's and Granite 4.0's
    (``mamba_n_heads``, ``mamba_d_head``, ``mamba_d_state``, ``mamba_n_groups``, ``mamba_d_conv``,
    ``mamba_conv_bias``, ``mamba_proj_bias``, ``mamba_chunk_size``, ``rms_norm_eps``;
    ``mamba_expand x hidden_size`` wide; Falcon-H1's ``mamba_d_ssm`` wide where given, ``out_proj``
    biased by ``projectors_bias``).

    Raises:
      ValueError: heads that do not tile the width, groups that do not divide the heads, or an
        activation other than SiLU.
    """
    limit = tuple(float(v) for v in (getattr(config, "time_step_limit", None) or (0.0, float("inf"))))
    if config.model_type == "mamba2":
        layout = Mamba2Layout(config.num_heads, config.head_dim, config.n_groups, config.state_size,
                              config.conv_kernel, bool(config.use_conv_bias), bool(config.use_bias),
                              int(config.chunk_size), limit, config.layer_norm_epsilon)
        activation = config.hidden_act
        width = int(config.expand * config.hidden_size)
        if layout.intermediate_size != width:
            raise ValueError(f"mamba2: num_heads ({layout.heads}) x head_dim ({layout.head_dim}) must be expand x "
                             f"hidden_size ({width})")
    elif config.model_type == "zamba2":  # its mixer's convolution always biased, its norm's epsilon fixed
        limit = (float(config.time_step_min), float("inf"))
        layout = Mamba2Layout(config.n_mamba_heads, config.mamba_headdim, config.mamba_ngroups, config.mamba_d_state,
                              config.mamba_d_conv, True, bool(config.add_bias_linear), int(config.chunk_size), limit,
                              1e-5)
        activation = "silu"
        width = int(config.mamba_expand * config.hidden_size)
        if layout.intermediate_size != width:
            raise ValueError(f"zamba2: n_mamba_heads ({layout.heads}) must divide mamba_expand x hidden_size ({width})")
    elif config.model_type == "nemotron_h":
        layout = Mamba2Layout(config.mamba_num_heads, config.mamba_head_dim, config.n_groups, config.ssm_state_size,
                              config.conv_kernel, bool(config.use_conv_bias), bool(config.use_bias),
                              int(config.chunk_size), limit, config.layer_norm_epsilon)
        activation = config.mamba_hidden_act
    else:
        falcon = config.model_type == "falcon_h1"
        layout = Mamba2Layout(config.mamba_n_heads, int(config.mamba_d_head), config.mamba_n_groups,
                              config.mamba_d_state, config.mamba_d_conv, bool(config.mamba_conv_bias),
                              bool(config.mamba_proj_bias), int(config.mamba_chunk_size), limit, config.rms_norm_eps,
                              bool(config.projectors_bias) if falcon else None)
        activation = config.hidden_act
        width = mamba_width(config)
        if layout.intermediate_size != width:
            what = "mamba_d_ssm" if falcon and config.mamba_d_ssm is not None else "mamba_expand x hidden_size"
            raise ValueError(f"{config.model_type}: mamba_n_heads ({layout.heads}) x mamba_d_head ({layout.head_dim}) "
                             f"must be {what} ({width})")
    if layout.heads % layout.groups:
        raise ValueError(f"{config.model_type}: the Mamba-2 heads ({layout.heads}) must be a multiple of its groups "
                         f"({layout.groups})")
    if activation != "silu":
        raise ValueError(f"{config.model_type}: the Mamba-2 layers' activation {activation!r} is not supported; "
                         f"expected 'silu'")
    return layout


class Mamba2Mixer(nnx.Module):
    """The Mamba-2 mixer (see the module's docstring). Its cache: ``{"conv" [batch, kernel - 1,
    conv channels], "ssm" [batch, heads, head_dim, state_size]}`` (the state in float32)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "dt_bias": ("dt_bias", False), "A_log": ("A_log", False), "D": ("D", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        layout = mamba2_layout(config)
        self.num_heads, self.head_dim = layout.heads, layout.head_dim
        self.n_groups, self.state_size = layout.groups, layout.state_size
        self.intermediate_size, self.conv_dim = layout.intermediate_size, layout.conv_dim
        self.chunk_size, self.time_step_limit = layout.chunk_size, layout.time_step_limit
        kw = dict(use_bias=layout.proj_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = nnx.Linear(config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, **kw)
        self.conv1d = Lfm2Conv1d(self.conv_dim, layout.conv_kernel, use_bias=layout.conv_bias,
                                 param_dtype=param_dtype, init_std=config.initializer_range, rngs=rngs)
        # transformers' initialisation: A = 1..heads, D and dt_bias ones
        self.dt_bias = nnx.Param(jnp.ones((self.num_heads,), param_dtype))
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, self.num_heads + 1, dtype=jnp.float32)).astype(param_dtype))
        self.D = nnx.Param(jnp.ones((self.num_heads,), param_dtype))
        self.norm = GatedGroupRMSNorm(self.intermediate_size, self.n_groups, epsilon=layout.epsilon, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        bias = layout.proj_bias if layout.out_bias is None else layout.out_bias
        self.out_proj = nnx.Linear(self.intermediate_size, config.hidden_size, **{**kw, "use_bias": bias})

    def __call__(self, x, token_mask=None, cache=None, segment_ids=None):
        """``token_mask``: ``[batch, seq]``, 0 on padding (``None``: none); ``cache``: ``{"conv",
        "ssm"}`` or ``None``; ``segment_ids``: packed rows, each sequence convolved and scanned from
        zeros. Returns ``(out, the new cache or None)``."""
        dtype = x.dtype
        mask = None if token_mask is None else token_mask[..., None].astype(dtype)
        if mask is not None:
            x = x * mask
        b, s, _ = x.shape
        z, xbc, dt = jnp.split(self.project(x), [self.intermediate_size, self.intermediate_size + self.conv_dim],
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
        if (low, high) != (0.0, float("inf")) and not (cache is not None and s == 1):  # decoding: unclamped
            dt = jnp.clip(dt, low, high)
        hidden = hidden.reshape(b, s, self.num_heads, self.head_dim)
        y, state = ssd_scan(hidden, dt, -jnp.exp(per_head(self.A_log)),
                            B.reshape(b, s, self.n_groups, self.state_size),
                            C.reshape(b, s, self.n_groups, self.state_size), self.chunk_size,
                            None if cache is None else cache["ssm"], segment_ids)
        y = y + per_head(self.D)[None, None, :, None] * hidden.astype(jnp.float32)
        out = self.out_proj(self.gated(y.reshape(b, s, -1), z).astype(dtype))
        new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype), "ssm": state}
        return out, new_cache

    def project(self, x):
        """``in_proj``'s output: the gate, the convolution's input and the time steps, end to end."""
        return self.in_proj(x)

    def gated(self, y, z):
        """The scan's output ``y`` gated by ``z`` and normalised (``norm``), before ``out_proj``."""
        return self.norm(y, z)


def mamba_width(config) -> int:
    """Bamba's, Granite 4.0's and Falcon-H1's Mamba-2 width: ``mamba_expand x hidden_size``, or
    Falcon-H1's ``mamba_d_ssm`` where it gives one."""
    d_ssm = getattr(config, "mamba_d_ssm", None) if config.model_type == "falcon_h1" else None
    return int(config.mamba_expand * config.hidden_size) if d_ssm is None else int(d_ssm)


def mamba_cache(config, batch: int, dtype) -> dict[str, jax.Array]:
    """An empty Mamba-2 layer cache (see :class:`Mamba2Mixer`)."""
    layout = mamba2_layout(config)
    return {"conv": jnp.zeros((batch, layout.conv_kernel - 1, layout.conv_dim), dtype),
            "ssm": jnp.zeros((batch, layout.heads, layout.head_dim, layout.state_size), np.float32)}
