"""LoRA as pure functions of arrays: init, the DoRA rescaling, merge, and PEFT's torch layouts.

Both front ends call these: the NNX layers (``_layer.py``, ``_layer_general.py``) and the Linen
interceptors (``_linen.py``). Each sees a targeted kernel as a 2-D ``[n_in, n_out]`` matrix (a
``LinearGeneral``/``Einsum`` kernel flattened, a conv kernel ``[*k, in, out]`` reshaped to
``[prod(k) * in, out]``), ``A`` as ``[n_in, r]`` (a conv's ``A [*k, in, r]`` reshapes to it) and ``B``
as ``[r, n_out]``, so each formula below is written once:

    delta   s * A @ B
    DoRA    f = m / ||W + s A B||  (per output unit, the norm detached from the gradient)
            y = base(x) + (f - 1) * base(x) + f * s * lora(x)
    merge   W' = W + s A B, then W' * m / ||W'|| with DoRA

Float32 throughout; the callers cast back to the layer's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.nn._keys import LayerKey, fold_in, jax_key, sampler


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static settings of one adapter on one layer.

    Attributes:
      r: the rank after ``rank_pattern``.
      alpha: ``lora_alpha`` after ``alpha_pattern``.
      scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.
      dropout: dropout rate on the adapter input (not applied to embeddings, as in PEFT).
      use_dora: weight-decomposed LoRA: a trainable magnitude per output unit.
      lora_bias: ``lora_B`` has a bias.
      freeze_b: ``lora_B`` never trains (MiCA, ``init_lora_weights="mica"``).
      arrow: ``(top_k, router_temperature)`` of an Arrow router (``create_arrow_model``), which
        routes each token over the layer's other adapters instead of applying its own factors.
      block_diagonal: ``("A" or "B", nblocks)`` under BD-LoRA (``use_bdlora``): that factor is held
        as its ``nblocks`` diagonal blocks, ``[nblocks, n_in / nblocks, r / nblocks]`` for ``A``,
        ``[nblocks, r / nblocks, n_out / nblocks]`` for ``B`` (:func:`block_diagonal`).
      kasa: ``(beta, gamma)`` under KaSA (``kasa_config``): the update is ``s * A diag(lora_diag) B``
        and the base weight lost its ``r`` smallest singular components (:func:`kasa_truncated`).
      velora: ``(num_groups, scale, init_type)`` under VeLoRA (``velora_config``): ``A``'s gradient
        from the compressed input (:func:`velora_matmul`).
      alora: aLoRA's invocation tokens (``alora_invocation_tokens``): the update only from their
        last occurrence on (``peftjax.tuners.lora._alora``).
    """

    r: int
    alpha: float
    scaling: float
    dropout: float = 0.0
    use_dora: bool = False
    lora_bias: bool = False
    freeze_b: bool = False
    arrow: tuple[int, float] | None = None
    block_diagonal: tuple[str, int] | None = None
    kasa: tuple[float, float] | None = None
    velora: tuple[int, float, str] | None = None
    alora: tuple[int, ...] | None = None

    @classmethod
    def for_target(cls, config, name: str) -> "LoraSpec":
        """The settings ``config`` gives the target ``name`` (its rank and alpha patterns applied)."""
        r, alpha, scaling = config.scaling_for(name)
        return cls(r=r, alpha=alpha, scaling=scaling, dropout=float(config.lora_dropout),
                   use_dora=bool(config.use_dora), lora_bias=bool(config.lora_bias),
                   freeze_b=freezes_b(config.init_lora_weights), arrow=arrow_routing(config),
                   block_diagonal=config.bdlora_factor(name) if hasattr(config, "bdlora_factor") else None,
                   kasa=kasa_weights(config), velora=velora_settings(config),
                   alora=getattr(config, "alora_invocation_tokens", None))


# --------------------------------------------------------------------------------------------
# VeLoRA: A's gradient from the input compressed to one value per group of features


def velora_settings(config) -> tuple[int, float, str] | None:
    """``(num_groups, scale, init_type)`` of a VeLoRA config, ``None`` for any other adapter."""
    velora = getattr(config, "velora_config", None)
    if velora is None:
        return None
    return int(velora["num_groups"]), float(velora["scale"]), str(velora["init_type"])


def _group_size(n_in: int, num_groups: int) -> int:
    """A sub-token's length: ``ceil(n_in / num_groups)`` (PEFT's ``_get_group_dim``)."""
    return -(-n_in // num_groups)


def _grouped(x: jax.Array, num_groups: int) -> jax.Array:
    """``x [t, in]`` as ``[t, num_groups, ceil(in / num_groups)]``, zero-padded (PEFT's sub-tokens)."""
    size = _group_size(x.shape[-1], num_groups)
    x = jnp.pad(x, ((0, 0), (0, num_groups * size - x.shape[-1])))
    return x.reshape(x.shape[0], num_groups, size)


def velora_projection(key, n_in: int, settings) -> jax.Array:
    """An adapter's stored projection ``[ceil(n_in / num_groups)]``: ``"random"`` a normalised
    normal draw (PEFT's ``torch.randn``, not reproduced), ``"batch_average"`` zeros (each step
    computes its own)."""
    num_groups, _, init_type = settings
    size = _group_size(n_in, num_groups)
    if init_type == "random":
        return jax.device_put(velora_unit(np.asarray(sampler(_sub_key(key, 2)).normal((size,)))))
    return jax.device_put(np.zeros((size,), np.float32))


def velora_unit(v):
    """PEFT's ``_normalize_projection``: float32, unit norm (all ones, normalised, for a zero vector);
    NumPy in, NumPy out."""
    xp = np if isinstance(v, np.ndarray) else jnp
    v = v.astype(np.float32)
    norm = xp.linalg.norm(v)
    ones = xp.ones_like(v) / np.float32(math.sqrt(v.shape[0]))
    return xp.where(norm == 0, ones, v / xp.where(norm == 0, np.float32(1), norm))


def velora_batch_projection(x: jax.Array, num_groups: int) -> jax.Array:
    """``"batch_average"``: the normalised mean sub-token of this input ``x [t, in]`` (no gradient)."""
    grouped = jax.lax.stop_gradient(_grouped(x, num_groups))
    return velora_unit(jnp.mean(grouped.reshape(-1, grouped.shape[-1]), axis=0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def velora_matmul(x: jax.Array, a: jax.Array, projection: jax.Array, num_groups: int, scale: float) -> jax.Array:
    """``x @ a`` (``x [t, in]``, ``a [in, r]``) whose backward pass keeps of ``x`` only its sub-tokens'
    coordinates on ``projection`` (``[t, num_groups]``): ``a``'s gradient takes ``x`` rebuilt from them
    times ``scale`` (PEFT's ``VeloraFunction``); ``x``'s gradient is exact."""
    return x @ a


def _velora_fwd(x, a, projection, num_groups, scale):
    compressed = jnp.einsum("tgd,d->tg", _grouped(x, num_groups), projection.astype(x.dtype))
    return x @ a, (compressed, a, projection, x.shape[-1])


def _velora_bwd(num_groups, scale, residuals, g):
    compressed, a, projection, n_in = residuals
    g = g.astype(a.dtype)
    rebuilt = (compressed.astype(g.dtype)[:, :, None] * projection.astype(g.dtype)[None, None, :])
    rebuilt = rebuilt.reshape(compressed.shape[0], -1)[:, :n_in] * np.asarray(scale, g.dtype)
    return g @ a.T, rebuilt.T @ g, jnp.zeros_like(projection)


velora_matmul.defvjp(_velora_fwd, _velora_bwd)


def velora_branch(h: jax.Array, a: jax.Array, b: jax.Array, projection: jax.Array, settings) -> jax.Array:
    """LoRA's ``(h @ A) @ B`` with VeLoRA's backward pass for ``A`` (see :func:`velora_matmul`);
    ``projection`` is the adapter's stored vector, or this input's own under ``"batch_average"``."""
    num_groups, scale, init_type = settings
    x = h.reshape(-1, h.shape[-1])
    if init_type == "batch_average":
        projection = velora_batch_projection(x, num_groups)
    u = velora_matmul(x, a, projection.astype(x.dtype), num_groups, scale)
    return (u @ b).reshape(*h.shape[:-1], b.shape[-1])


# --------------------------------------------------------------------------------------------
# KaSA: the base truncated, a trained diagonal between the factors


def kasa_weights(config) -> tuple[float, float] | None:
    """``(beta, gamma)`` of a KaSA config's regularisers, ``None`` for any other adapter."""
    kasa = getattr(config, "kasa_config", None)
    return None if kasa is None else (float(kasa["beta"]), float(kasa["gamma"]))


def check_kasa_rank(r: int, shape: tuple[int, int], where: str) -> None:
    """KaSA keeps ``min(shape) - r`` singular components of the weight: at least one (PEFT's rule)."""
    if r >= min(shape):
        raise ValueError(f"{where}: KaSA requires `r` ({r}) to be smaller than min(in_features, out_features) "
                         f"({min(shape)}) so that at least one singular component of the base weight is preserved "
                         "after truncation.")


def kasa_truncated(w2: jax.Array, r: int) -> jax.Array:
    """``w2`` without its ``r`` smallest singular components (PEFT's ``_truncate_base_weight``:
    float32, the rank ``min(shape) - r`` approximation; unique, whatever signs the SVD picks)."""
    u, s, vt = jnp.linalg.svd(w2.astype(jnp.float32), full_matrices=False)
    keep = min(w2.shape) - r
    return (u[:, :keep] * s[None, :keep]) @ vt[:keep]


def _sub_key(key, data: int):
    """A key of its own beside ``key``'s draws (a :class:`LayerKey` or a JAX key), formed on the host."""
    if isinstance(key, LayerKey):
        return LayerKey(fold_in(key.key, data), key.index)
    return fold_in(key, data)


def kasa_regularizer(a: jax.Array, b: jax.Array, diag: jax.Array, beta: float, gamma: float) -> jax.Array:
    """PEFT's ``_kasa_layer_regularization_loss`` on Flax-layout factors ``a [in, r]``, ``b [r, out]``:
    ``beta * sum(diag^2) + gamma * (||B^T B - I||_F + ||A A^T - I||_F)`` in PEFT's layouts
    (``B^T B`` is ``b b^T`` here, ``A A^T`` is ``a^T a``), float32."""
    a, b, diag = (x.astype(jnp.float32) for x in (a, b, diag))
    eye = jnp.eye(diag.shape[0], dtype=jnp.float32)
    orthogonality = jnp.linalg.norm(b @ b.T - eye) + jnp.linalg.norm(a.T @ a - eye)
    return beta * jnp.sum(diag**2) + gamma * orthogonality


# --------------------------------------------------------------------------------------------
# BD-LoRA: one factor block-diagonal


def check_block_diagonal(spec: LoraSpec, n_in: int, n_out: int, where: str) -> None:
    """Raises ``ValueError`` (PEFT's condition, naming the layer) where ``nblocks`` does not divide
    the block-diagonal factor's two sizes, and ``NotImplementedError`` for ``lora_bias`` on a
    block-diagonal ``B`` (PEFT's has no bias)."""
    side, nb = spec.block_diagonal
    if spec.lora_bias and side == "B":
        raise NotImplementedError(f"{where}: lora_bias with a block-diagonal lora_B (BD-LoRA's target_modules_bd_b) "
                                  "is not supported; PEFT's block-diagonal B has no bias")
    rows, cols = (n_in, spec.r) if side == "A" else (spec.r, n_out)
    if rows % nb or cols % nb:
        raise ValueError(f"{where}: BD-LoRA's block-diagonal lora_{side} maps {rows} to {cols} features, which "
                         f"use_bdlora.nblocks={nb} does not divide")


def block_diagonal(blocks):
    """The dense matrix of a factor held as its diagonal blocks: ``[..., nb, p, q]`` ->
    ``[..., nb * p, nb * q]`` with zeros off the diagonal (NumPy or JAX, as given)."""
    xp = np if isinstance(blocks, np.ndarray) else jnp
    *lead, nb, p, q = blocks.shape
    dense = xp.einsum("...ipq,ij->...ipjq", blocks, xp.eye(nb, dtype=blocks.dtype))
    return dense.reshape(*lead, nb * p, nb * q)


def block_diagonal_init(key, side: str, nb: int, n_in: int, n_out: int, r: int):
    """PEFT's ``BlockDiagonalLinear`` init of the block-diagonal factor, in blocks: ``A``
    ``kaiming_uniform_`` with its default ``a=0`` (bound ``sqrt(6 / fan_in)``, fan-in ``n_in / nb``),
    ``B`` zeros, whatever ``init_lora_weights`` gave the other factor."""
    if side == "B":
        return np.zeros((nb, r // nb, n_out // nb), np.float32)
    m = n_in // nb
    bound = math.sqrt(6.0 / m)
    return sampler(key).uniform((nb, m, r // nb), -bound, bound)


def block_diagonal_branch(h: jax.Array, a: jax.Array, b: jax.Array, side: str) -> jax.Array:
    """``(h @ A) @ B`` with ``A`` (``side == "A"``) or ``B`` held as diagonal blocks: block ``i``
    reads the ``i``-th slice of its input and writes the ``i``-th slice of its output."""
    x = h.reshape(-1, h.shape[-1])
    if side == "A":
        nb, m, n = a.shape
        u = jnp.einsum("tbm,bmn->tbn", x.reshape(-1, nb, m), a).reshape(x.shape[0], nb * n)
        y = u @ b
    else:
        nb, n, o = b.shape
        y = jnp.einsum("tbn,bno->tbo", (x @ a).reshape(-1, nb, n), b).reshape(x.shape[0], nb * o)
    return y.reshape(*h.shape[:-1], y.shape[-1])


def block_diagonal_layout(side: str, nb: int) -> dict:
    """``torch_layout``'s entry for the block-diagonal factor: PEFT's ``BlockDiagonalLinear`` weight
    ``[nb * q, p]`` (block ``i`` its rows ``i q .. (i + 1) q``, ``[out, in]``) <-> ``[nb, p, q]``."""
    def to_torch(blocks):
        return blocks.transpose(0, 2, 1).reshape(-1, blocks.shape[1])

    def from_torch(t):
        return t.reshape(nb, -1, t.shape[1]).transpose(0, 2, 1)

    return {f"lora_{side}": (f"lora_{side}.weight", to_torch, from_torch)}


# --------------------------------------------------------------------------------------------
# Arrow


def arrow_prototype(a: jax.Array, b: jax.Array, start: jax.Array, iters: int = 15, eps: float = 1e-8) -> jax.Array:
    """The top right singular vector of ``(A B)^T`` in Flax layout, i.e. of PEFT's ``ΔW = B A``,
    without forming it: PEFT's power iteration ``v <- A^T (B^T B) A v`` (normalised, ``eps`` in the
    norm) from ``start``, ``iters`` times, in float32. ``a [in, r]``, ``b [r, out]``, ``start [in]``."""
    hi = jax.lax.Precision.HIGHEST
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    c = jnp.matmul(b, b.T, precision=hi)  # [r, r]

    def step(_, v):
        w = jnp.matmul(a, jnp.matmul(c, jnp.matmul(a.T, v, precision=hi), precision=hi), precision=hi)
        return w / (jnp.linalg.norm(w) + eps)

    v = start.astype(jnp.float32)
    return jax.lax.fori_loop(0, iters, step, v / (jnp.linalg.norm(v) + eps))


def arrow_route(x: jax.Array, prototypes: jax.Array, a: jax.Array, b: jax.Array, scales: jax.Array, top_k: int,
                temperature: float) -> jax.Array:
    """Arrow's routed update (PEFT's ``ArrowLoraLinearLayer.forward``) for tokens ``x [t, in]``.

    Each token scores every expert by ``|x . p_e|`` (``prototypes [E, in]``), keeps its ``top_k``,
    and weighs them by a softmax of those scores over ``temperature`` (the others get zero); the
    update is ``sum_e coeff_e * s_e * (x A_e) B_e`` with ``a [E, in, r]``, ``b [E, r, out]`` and
    ``scales [E]``. The weights are folded into ``x A_e`` before the ``B`` products, so no
    ``[t, E, out]`` tensor is formed (PEFT forms it; the sum is the same).
    """
    sim = jnp.abs(x @ prototypes.T)  # [t, E]
    top, idx = jax.lax.top_k(sim, top_k)
    scores = jnp.put_along_axis(jnp.full_like(sim, -jnp.inf), idx, top, axis=1, inplace=False)
    coeff = jax.nn.softmax(scores / temperature, axis=-1) * scales[None, :]  # [t, E]
    z = jnp.einsum("tf,efr->ter", x, a) * coeff[..., None]
    return jnp.einsum("ter,ero->to", z, b)


# --------------------------------------------------------------------------------------------
# Init


def kaiming_uniform(draws, shape, fan_in: int):
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), float32."""
    bound = 1.0 / math.sqrt(fan_in)
    return draws.uniform(shape, -bound, bound)


def canonical_init(init):
    """``init_lora_weights`` as the layers compare it: PEFT matches ``"gaussian"`` and ``"olora"``
    case-insensitively (``"Gaussian"``, ``"OLoRA"`` work there), every other string exactly."""
    if isinstance(init, str) and init.lower() in ("gaussian", "olora"):
        return init.lower()
    return init


def decomposes(init) -> bool:
    """Whether ``init`` (PiSSA, randomized PiSSA, OLoRA, LoftQ) rewrites the base weight."""
    return is_loftq(init) or isinstance(init, str) and canonical_init(init).startswith(("pissa", "olora"))


def arrow_routing(config) -> tuple[int, float] | None:
    """``(top_k, router_temperature)`` of a router's config, ``None`` for any other adapter."""
    arrow = getattr(config, "arrow_config", None)
    return None if arrow is None else (int(arrow["top_k"]), float(arrow["router_temperature"]))


def is_mica(init) -> bool:
    """MiCA's init, in any case: PEFT's layers compare ``init_lora_weights.lower() == "mica"``."""
    return isinstance(init, str) and init.lower() == "mica"


def freezes_b(init) -> bool:
    """Whether ``init`` freezes ``lora_B``. Only the exact ``"mica"``: PEFT resolves its MiCA
    variant (the one that freezes ``B``) by ``init_lora_weights == "mica"``, so ``"MiCA"`` gets
    MiCA's factors with both of them training, and so it does here."""
    return init == "mica"


def is_corda(init) -> bool:
    """CorDA's init reaches each layer as that layer's eigens (``CordaEigens``), not as the string."""
    return hasattr(init, "S_WC")


def is_astra(init) -> bool:
    """Astra's init reaches each layer as that layer's eigens (``AstraEigens``), not as the string."""
    from peftjax.tuners.lora._astra import AstraEigens

    return isinstance(init, AstraEigens)


def is_loraga(init) -> bool:
    """LoRA-GA's init reaches each layer as that layer's gradient and settings (``LoraGaInit``)."""
    return hasattr(init, "loraga_grad")


def is_loftq(init) -> bool:
    """LoftQ's init reaches the layers as its settings (a ``LoftQConfig``), not as the string."""
    return hasattr(init, "loftq_bits")


def check_init(kind: str, init, where: str) -> None:
    """Raises ``NotImplementedError`` naming ``where`` when layer ``kind`` cannot take ``init``.

    PiSSA, OLoRA, LoftQ, EVA, CorDA, LoRA-GA and the orthogonal init factor a plain 2-D weight
    (``kind == "linear"``); embeddings take the default, ``False``, ``"gaussian"``,
    ``"orthogonal"``, ``"lora_ga"`` and ``"nora"`` (which PEFT's embedding layer treats as its
    default init) and MiCA; convolutions and the multi-axis layers (``"general"``) the default, ``False`` or
    ``"gaussian"`` (PEFT has no MiCA variant for its convolutions either).
    """
    if kind == "linear" or not (is_loftq(init) or is_corda(init) or is_astra(init) or isinstance(init, str)):
        return
    init = "loftq" if is_loftq(init) else "corda" if is_corda(init) else "astra" if is_astra(init) else \
        canonical_init(init)
    # PEFT's embedding layer treats "orthogonal", "lora_ga" and "nora" as its default init
    if init == "gaussian" or (kind == "embed" and (init in ("orthogonal", "lora_ga", "nora") or is_mica(init))):
        return
    what = {"embed": "embeddings", "conv": "convolutions"}.get(kind, "this layer type")
    raise NotImplementedError(f"{where}: init_lora_weights={init!r} is not supported on {what}")


def peft_weight_shape(kind: str, n_in: int, n_out: int) -> tuple[int, int]:
    """A layer's 2-D weight as PEFT's messages name it: ``(out, in)`` (torch's ``nn.Linear``), an
    embedding's table ``(num, dim)``."""
    return (n_in, n_out) if kind == "embed" else (n_out, n_in)


def check_init_rank(init, r: int, where: str, shape: tuple[int, ...] | None = None) -> None:
    """PEFT's refusals of a rank the init cannot build: an odd one for the orthogonal init (it
    splits a basis into two halves), and for MiCA one above ``min(shape)``, ``shape`` the layer's
    2-D weight as :func:`peft_weight_shape` gives it (there are no more singular vectors than that)."""
    if init == "orthogonal" and r % 2:
        raise ValueError(f"{where}: Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")
    if init == "lora_ga" and shape is not None and 2 * r > min(shape):
        raise ValueError(f"{where}: LoRA-GA splits the top 2r singular vectors of the gradient between A and B, so it "
                         f"needs 2 * r <= min(in_features, out_features); got r={r} for a layer with weight shape "
                         f"{tuple(shape)} (max usable r is {min(shape) // 2}).")
    if is_mica(init) and shape is not None and r > min(shape):
        raise ValueError(f"{where}: MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer "
                         f"with weight shape {tuple(shape)} (max usable r is {min(shape)}).")


def init_factors(key, kind: str, init, in_features: int, out_features: int, r: int):
    """Initial ``(A, B)`` in Flax layout, following PEFT's ``reset_lora_parameters``.

    ``key`` is a JAX key or a :class:`peftjax.nn._keys.LayerKey`; with a concrete key the plain
    inits draw on the host (NumPy arrays back, nothing compiled), with a traced one, and for the
    orthogonal init, with JAX.
    """
    init = canonical_init(init)
    if init == "orthogonal" and kind != "embed":
        return orthogonal_factors(jax_key(key), in_features, out_features, r)
    draws = sampler(key)
    if kind == "embed":  # A: [num, r], B: [r, dim]
        if init is False:
            return draws.normal((in_features, r)), draws.normal((r, out_features))
        return draws.zeros((in_features, r)), draws.normal((r, out_features))
    if init is False:  # nn.Linear's own init for both factors: not a no-op adapter
        return kaiming_uniform(draws, (in_features, r), in_features), kaiming_uniform(draws, (r, out_features), r)
    if init == "gaussian":
        return draws.normal((in_features, r)) / np.float32(r), draws.zeros((r, out_features))
    a = kaiming_uniform(draws, (in_features, r), in_features)
    if init == "nora":
        a = nora_normalized(a, axis=1)
    return a, draws.zeros((r, out_features))


def nora_normalized(a, axis: int):
    """NoRA (PEFT's ``nora_init``): ``a`` with each input's ``r`` values (``axis``) scaled to unit
    L2 norm, the norm clamped below at 1e-6; NumPy in, NumPy out."""
    xp = np if isinstance(a, np.ndarray) else jnp
    return a / xp.maximum(xp.linalg.norm(a, axis=axis, keepdims=True), np.float32(1e-6))


def init_weights(key, kind: str, init, w2: jax.Array, spec: LoraSpec) -> tuple[dict, jax.Array | None]:
    """One adapter's initial weights for a layer whose weight is ``w2 [n_in, n_out]``.

    Returns ``({"lora_A", "lora_B", ["lora_B_bias"], ["lora_magnitude_vector"]}, residual)``,
    float32, ``A`` as ``[n_in, r]``; ``residual`` is the base weight PiSSA, OLoRA, LoftQ, CorDA,
    Astra and LoRA-GA leave behind (``None`` for the other inits). ``"eva"`` starts as the default init (``B`` zero);
    ``initialize_lora_eva_weights`` then sets ``A``. DoRA's magnitude is ``||W + s A B||`` with ``W`` the base
    weight after that rewrite, as PEFT computes it (for PiSSA/OLoRA that is the original weight).
    """
    n_in, n_out = w2.shape
    residual = None
    if is_loftq(init):
        a, b, residual = loftq(w2, spec.r, init)
    elif is_corda(init):
        from peftjax.tuners.lora._corda import corda_factors

        a, b, residual = corda_factors(w2, init, spec.scaling)
    elif is_astra(init):
        from peftjax.tuners.lora._astra import astra_factors

        a, b, residual = astra_factors(w2, init, spec.scaling)
    elif decomposes(init):
        a, b, residual = decompose(init, w2, spec, jax_key(key))
    elif is_mica(init):
        a, b = mica_factors(w2, spec.r)
    elif is_loraga(init):
        a, b, residual = loraga_factors(w2, init, spec, jax_key(key))
    else:
        a, b = init_factors(key, kind, init, n_in, n_out, spec.r)
    if spec.block_diagonal is not None:  # PEFT's variant replaces that factor after the layer's init
        side, nb = spec.block_diagonal
        blocks = block_diagonal_init(key, side, nb, n_in, n_out, spec.r)
        a, b = (blocks, b) if side == "A" else (a, blocks)
    diag = None
    if spec.kasa is not None:  # PEFT's variant, after the init: torch.randn(r) and the truncated base
        diag = sampler(_sub_key(key, 1)).normal((spec.r,))
        residual = kasa_truncated(w2, spec.r)
    # host arrays move with device_put: jnp.asarray would compile a program per shape (lax.stage)
    a, b = (jax.device_put(x) if isinstance(x, np.ndarray) else x.astype(jnp.float32) for x in (a, b))
    weights = {"lora_A": a, "lora_B": b}
    if diag is not None:
        weights["lora_diag"] = jax.device_put(diag) if isinstance(diag, np.ndarray) else diag
    if spec.lora_bias:
        weights["lora_B_bias"] = jax.device_put(np.zeros((n_out,), np.float32))
    if spec.use_dora:
        base = w2 if residual is None else residual
        weights["lora_magnitude_vector"] = unit_norm(base.astype(jnp.float32) + delta(a, b, spec.scaling))
    return weights, residual


def mica_factors(w2: jax.Array, r: int) -> tuple[jax.Array, jax.Array]:
    """MiCA (Minor Component Adaptation, PEFT's ``mica_init``): ``A`` zero and ``B`` the ``r``
    left singular vectors of ``W [out, in]`` with the smallest singular values, so the adapter
    starts as a no-op and trains only along the weight's minor directions. An embedding's table
    ``[num, dim]`` reads the same way (PEFT takes the SVD of its transpose).

    The SVD runs in float32; ``B`` is rounded to the weight's dtype, as PEFT stores it before
    casting adapters to float32. A singular vector's sign is the SVD routine's choice, so a row of
    ``B`` may have the opposite sign to torch's. Training does not care: that flips the gradient
    of the matching column of ``A`` too (SGD and Adam updates flip with it), so ``B @ A`` and the
    model's outputs follow the same path; a file, written by either framework, keeps its signs.
    """
    u, _, _ = jnp.linalg.svd(w2.astype(jnp.float32).T, full_matrices=False)  # u: [out, min(in, out)]
    b = u[:, u.shape[1] - r:].T.astype(w2.dtype).astype(jnp.float32)  # [r, out]
    return np.zeros((w2.shape[0], r), np.float32), b


def loraga_factors(w2: jax.Array, init, spec: LoraSpec, key: jax.Array):
    """LoRA-GA (PEFT's ``lora_ga_init``) for ``W = w2.T``: ``(A [in, r], B [r, out], residual [in, out])``.

    ``init`` carries the layer's gradient ``G [out, in]`` and the settings. The top ``2r`` singular
    triplets of ``G`` come from :func:`svd_lowrank` (``4r`` wide, 4 subspace iterations, as PEFT
    calls ``torch.svd_lowrank``); ``A`` takes ``r`` of the right singular vectors and ``B`` ``r``
    left ones times their singular values (``direction``), then ``scale`` applies. Both are rounded
    to the weight's dtype, and the residual ``W - s B A`` is taken against the rounded factors,
    as PEFT does. A randomized SVD's signs (and ``"random"``'s draw) come from ``key``; torch's
    RNG picks PEFT's, so each triplet matches PEFT's up to its sign.
    """
    settings = init.settings
    g = jnp.asarray(init.loraga_grad, jnp.float32)  # [out, in]
    r, s = spec.r, spec.scaling
    k_svd, k_pick, k_weight = jax.random.split(key, 3)
    u, sv, v = svd_lowrank(g, min(4 * r, min(g.shape)), niter=4, key=k_svd)
    u, sv, vh = u[:, :2 * r], sv[:2 * r], v.T[:2 * r]
    pick_a, pick_b = {
        "ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2)),
        "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
        "ArB2r": (np.arange(r), np.arange(r, 2 * r)),
    }.get(settings.direction, (None, None))
    if pick_a is None:  # "random": the same r triplets for both
        pick_a = pick_b = jax.random.permutation(k_pick, 2 * r)[:r]
    a, s_b = vh[pick_a], sv[pick_b]  # [r, in], [r]
    b = u[:, pick_b] * s_b[None, :]  # [out, r]
    if settings.scale == "stable":
        b = b * (w2.shape[1] ** 0.25 / settings.stable_gamma ** 0.5)
    elif settings.scale == "weight_svd":
        _, w_sv, _ = svd_lowrank(w2.astype(jnp.float32).T, r, niter=4, key=k_weight)
        b = jnp.where(s_b[0] > 0, b * (w_sv[0] / s_b[0]), b)
    elif settings.scale == "gd_scale":
        a, b = a / s, b / s
    a, b = (x.astype(w2.dtype).astype(jnp.float32) for x in (a, b))
    residual = w2.astype(jnp.float32).T - s * jnp.matmul(b, a, precision=jax.lax.Precision.HIGHEST)
    return a.T, b.T, residual.T


def orthogonal_factors(key, in_features: int, out_features: int, r: int) -> tuple[jax.Array, jax.Array]:
    """PEFT's ``orthogonal_init``: ``A`` from the odd rows of a random orthogonal ``[r, r]`` basis,
    ``B`` from the even rows, each through a Gaussian matrix and scaled by 1/10. Both factors are
    non-zero and ``A @ B`` is zero (the halves are orthogonal), so the adapter starts as a no-op
    whose gradient reaches both factors. Flax layout: ``A [in, r]``, ``B [r, out]``."""
    kq, ka, kb = jax.random.split(key, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (r, r)))
    q_odd, q_even = q[0::2], q[1::2]  # [r/2, r] each, rows orthogonal to each other
    hi = jax.lax.Precision.HIGHEST  # the product is zero only to the precision of these matmuls
    a = jnp.matmul(jax.random.normal(ka, (in_features, r // 2)), q_odd, precision=hi) / 10.0
    b = jnp.matmul(q_even.T, jax.random.normal(kb, (r // 2, out_features)), precision=hi) / 10.0
    return a, b


def loftq(w2: jax.Array, r: int, settings) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LoftQ (PEFT's ``loftq_init``): ``(A, B, Q)`` with ``Q`` the quantized-and-dequantized base
    weight and ``B @ A`` the rank-``r`` SVD of ``W - Q``, alternating ``loftq_iter`` times.

    ``Q`` uses bitsandbytes' codes over the torch ``[out, in]`` weight (NF4 in blocks of 64
    without double quantization, or int8 per row), so the rewritten base quantizes back to the
    same codes when loaded in 4 or 8 bits. As in PEFT, ``B @ A`` fits ``W - Q`` unscaled: the
    adapted weight is ``Q + (alpha / r) B @ A``, which equals ``W`` to the SVD's rank only when
    ``lora_alpha == r``.
    """
    from peftjax.quantization import _bnb

    w = np.asarray(w2, np.float32).T  # [out, in]
    res = w
    for i in range(settings.loftq_iter):
        if settings.loftq_bits == 4:
            q = _bnb.dequantize_4bit(_bnb.quantize_4bit(res, quant_type="nf4", blocksize=64))
        else:
            q = _bnb.int8_dequantize(*_bnb.int8_vectorwise_quant(res))
        u, sv, vh = np.linalg.svd((w - q).astype(np.float64), full_matrices=False)
        root = np.sqrt(sv[:r])
        b, a = u[:, :r] * root, root[:, None] * vh[:r]  # [out, r], [r, in]
        if i + 1 < settings.loftq_iter:
            res = w - (b @ a).astype(np.float32)
    return jnp.asarray(a.T, jnp.float32), jnp.asarray(b.T, jnp.float32), jnp.asarray(q.T)


def decompose(init: str, w2: jax.Array, spec: LoraSpec, key: jax.Array):
    """PiSSA (SVD) or OLoRA (QR) factors of ``W [n_in, n_out]`` and the residual ``W - s * A @ B``.

    PEFT's ``pissa_init`` / ``olora_init``, computed in PEFT's ``[out, in]`` orientation and
    returned in Flax layout. ``"pissa_niter_<N>"`` takes the top ``r`` singular triplets from
    :func:`svd_lowrank` (``key`` draws its test matrix) instead of the full SVD. Whatever the
    approximation, the residual is taken against the factors actually built, so
    ``residual + s * A @ B`` is ``W`` to rounding and the adapted model starts as the base model.
    """
    wt = w2.astype(jnp.float32).T  # [out, in]
    r, s = spec.r, spec.scaling
    init = canonical_init(init)
    if init.startswith("pissa"):
        niter = pissa_niter(init)
        if niter is None:
            v, sv, uh = jnp.linalg.svd(wt, full_matrices=False)
            vr, sr, uhr = v[:, :r], sv[:r], uh[:r]
        else:
            vr, sr, ur = svd_lowrank(wt, r, niter=niter, key=key)
            uhr = ur.T
        sr = sr / s
        a = jnp.sqrt(sr)[:, None] * uhr  # [r, in]
        b = vr * jnp.sqrt(sr)[None, :]  # [out, r]
    else:
        q, rr = jnp.linalg.qr(wt)
        a, b = rr[:r], q[:, :r]
    # HIGHEST: on GPU/TPU a default-precision f32 matmul (TF32 / bf16 passes) would leave the
    # residual ~1e-3 off, and the adapted model would no longer start as the base model
    residual = wt - s * jnp.matmul(b, a, precision=jax.lax.Precision.HIGHEST)
    return a.T, b.T, residual.T


def pissa_niter(init: str) -> int | None:
    """``N`` of ``"pissa_niter_<N>"`` (``None`` for exact ``"pissa"``); the config has validated it."""
    return None if init == "pissa" else int(init.removeprefix("pissa_niter_"))


def svd_lowrank(a: jax.Array, q: int, *, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``torch.svd_lowrank(a, q, niter)``: a rank-``q`` randomized SVD ``a ~ U diag(S) V^T``.

    Halko, Martinsson and Tropp (2009), Algorithm 5.1 on the basis of Algorithm 4.4, step for
    step as torch's ``_lowrank.py``: a tall-oriented ``a`` ([m, n], m >= n; a wide one is
    transposed), a Gaussian test matrix ``R [n, q]``, ``Q = qr(a R)``, then ``niter`` subspace
    iterations ``Q = qr(a qr(a^T Q))``, and the exact SVD of the small ``Q^T a [q, n]``. The
    error in the top singular subspace shrinks like ``(s_{q+1} / s_q) ** (2 niter + 1)``.
    torch draws ``R`` from its global RNG; here ``key`` does, so the result is reproducible.

    Args:
      a: the ``[m, n]`` matrix.
      q: the rank; a larger one gives ``min(m, n)`` triplets, as torch does.
      niter: the number of subspace iterations (``>= 0``).
      key: the PRNG key for the test matrix.

    Returns:
      ``(U [m, q], S [q], V [n, q])``, ``S`` descending.

    Example:
      >>> a = jnp.diag(jnp.array([4.0, 2.0, 1.0, 0.0]))
      >>> u, s, v = svd_lowrank(a, 2, niter=4, key=jax.random.key(0))
      >>> u.shape, s.round(4).tolist(), v.shape
      ((4, 2), [4.0, 2.0], (4, 2))
    """
    wide = a.shape[0] < a.shape[1]
    if wide:
        a = a.T
    q = min(q, a.shape[1])  # torch also returns min(m, n) triplets then; this keeps the loop's shapes fixed
    mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    r = jax.random.normal(key, (a.shape[1], q), a.dtype)
    basis = jnp.linalg.qr(mm(a, r))[0]

    def iteration(_, basis):
        return jnp.linalg.qr(mm(a, jnp.linalg.qr(mm(a.T, basis))[0]))[0]

    basis = jax.lax.fori_loop(0, niter, iteration, basis)  # a loop, not niter unrolled copies, under jit
    u, s, vh = jnp.linalg.svd(mm(basis.T, a), full_matrices=False)
    u, v = mm(basis, u), vh.T
    return (v, s, u) if wide else (u, s, v)


# --------------------------------------------------------------------------------------------
# Forward and merge


@jax.custom_vjp
def joint_matmul(x: jax.Array, w: jax.Array, u: jax.Array, b: jax.Array) -> jax.Array:
    """``x @ w + u @ b`` computed as the one matmul ``[x, u] @ [w; b]``.

    A LoRA layer's output is ``x @ W + (s x A) @ B``; written as that sum, XLA computes the two
    products as two buffers and folds the add into each reader, so both stay alive for the
    backward pass wherever the output is saved (two of each SwiGLU input of a Llama layer: 43 MiB
    of the benchmark step's 293, see benchmarks/README.md). As one matmul the output is a single
    buffer, and the thin ``u @ b`` rides on the big product. The frozen ``w`` is never merged with
    the adapter: ``b`` only extends the contraction. The gradients are the plain products, each
    traced only when its input is differentiated (never the frozen kernel's).

    Args:
      x: ``[tokens, n_in]``.
      w: ``[n_in, n_out]``.
      u: ``[tokens, r]``, the scaled ``s * dropout(x) @ A`` (several adapters: their ``u`` side by side).
      b: ``[r, n_out]`` (several adapters: their ``B`` stacked).

    Returns:
      ``[tokens, n_out]``.

    >>> x, w, u, b = jnp.ones((4, 3)), jnp.ones((3, 2)), jnp.ones((4, 1)), jnp.ones((1, 2))
    >>> joint_matmul(x, w, u, b).shape
    (4, 2)
    """
    return jnp.concatenate([x, u], axis=-1) @ jnp.concatenate([w, b], axis=0)


def _joint_matmul_fwd(x, w, u, b):
    # symbolic zeros: each input says whether it is differentiated; the residuals keep only what the
    # wanted gradients read (``None`` marks one not wanted), so the frozen kernel's is never traced
    y = joint_matmul(x.value, w.value, u.value, b.value)
    return y, (x.value if w.perturbed else None, w.value if x.perturbed else None,
               u.value if b.perturbed else None, b.value if u.perturbed else None)


def _joint_matmul_bwd(residuals, dy):
    x, w, u, b = residuals
    return (None if w is None else dy @ w.T, None if x is None else x.T @ dy,
            None if b is None else dy @ b.T, None if u is None else u.T @ dy)


joint_matmul.defvjp(_joint_matmul_fwd, _joint_matmul_bwd, symbolic_zeros=True)


def unit_norm(w: jax.Array) -> jax.Array:
    """The norm of each output unit's weights (last axis) over every other axis: DoRA's ``‖W‖``.

    On a ``[in, out]`` kernel this is PEFT's row norm of ``W[out, in]``.
    """
    return jnp.linalg.norm(w.astype(jnp.float32).reshape(-1, w.shape[-1]), axis=0)


def delta(a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``s * A @ B`` as ``[n_in, n_out]`` (``A``'s leading axes, a conv's ``[*k, in]``, flattened)."""
    return scaling * (a.reshape(-1, a.shape[-1]) @ b)


def dora_factor(magnitude: jax.Array, w2: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """DoRA's per-output factor ``m / ||W + s A B||``, the norm detached from the gradient (as PEFT)."""
    norm = jax.lax.stop_gradient(unit_norm(w2.astype(jnp.float32) + delta(a, b, scaling)))
    return magnitude / norm


def dora_output(factor: jax.Array, base: jax.Array, lora: jax.Array, scaling: float) -> jax.Array:
    """What DoRA adds to the base output: ``(f - 1) * base + f * s * lora``.

    ``factor`` is shaped by the caller to broadcast over the output; ``base`` is the base layer's
    output without its bias (PEFT recomputes it on the dropped-out input when dropout is on).
    """
    return (factor - 1) * base + factor * scaling * lora


def merged_weight(w2, a, b, scaling: float, magnitude=None) -> tuple[jax.Array, jax.Array | None]:
    """``W + s A B`` (float32), rescaled per output unit to ``magnitude`` with DoRA.

    Returns the merged weight and, with DoRA, the norm it divided by (what :func:`unmerged_weight`
    needs to undo it), else ``None``.
    """
    merged = w2.astype(jnp.float32) + delta(a, b, scaling)
    if magnitude is None:
        return merged, None
    norm = unit_norm(merged)
    return merged * (magnitude / norm)[None, :], norm


def unmerged_weight(w2, a, b, scaling: float, magnitude=None, norm=None) -> jax.Array:
    """The inverse of :func:`merged_weight` (``norm`` is the one it returned)."""
    w = w2.astype(jnp.float32)
    if magnitude is not None:
        w = w * (norm / magnitude)[None, :]
    return w - delta(a, b, scaling)


class EinsumFactor(NamedTuple):
    """An einsum ``lhs,kernel->out`` factored through a rank axis: ``lhs,A->mid`` then ``mid,B->out``.

    The kernel is read as a linear map from its contracted axes (shared with the input only) to
    its produced axes (in the output only); ``A`` holds the first, ``B`` the second, each in
    kernel order.
    """

    to_rank: str  # "bsd,dr->bsr"
    from_rank: str  # "bsr,rhk->bshk"
    contracted: tuple[int, ...]  # kernel axes shared with the input only, in kernel order
    produced: tuple[int, ...]  # kernel axes that appear in the output only, in kernel order


def factor_einsum(einsum_str: str) -> EinsumFactor:
    """Splits an einsum's kernel axes into contracted and produced ones; ellipses stay as they are.

    Raises:
      ValueError: the kernel cannot be factored so (says why): it has an ellipsis, a repeated
        axis, an axis shared by input and output (a batch axis of the kernel), or one that
        touches neither.
    """
    eq = einsum_str.replace(" ", "")
    inputs, out = eq.split("->")
    lhs, kernel = inputs.split(",")
    if "..." in kernel:
        raise ValueError("the kernel operand has an ellipsis")
    if len(set(kernel)) != len(kernel):
        raise ValueError("a kernel axis is repeated")
    lhs_letters, out_letters = set(lhs.replace("...", "")), set(out.replace("...", ""))
    contracted, produced = [], []
    for i, c in enumerate(kernel):
        if c in lhs_letters and c not in out_letters:
            contracted.append(i)
        elif c in out_letters and c not in lhs_letters:
            produced.append(i)
        elif c in lhs_letters:
            raise ValueError(f"kernel axis {c!r} is a batch axis shared by input and output")
        else:
            raise ValueError(f"kernel axis {c!r} is summed over without touching the input")
    rank = next(c for c in string.ascii_letters if c not in eq)
    # the input's kept axes (ellipsis included), once each, in input order
    kept, i = [], 0
    while i < len(lhs):
        token = "..." if lhs.startswith("...", i) else lhs[i]
        if (token == "..." or token in out_letters) and token not in kept:
            kept.append(token)
        i += len(token)
    mid = "".join(kept) + rank
    a_axes = "".join(kernel[i] for i in contracted) + rank
    b_axes = rank + "".join(kernel[i] for i in produced)
    return EinsumFactor(f"{lhs},{a_axes}->{mid}", f"{mid},{b_axes}->{out}", tuple(contracted), tuple(produced))


# --------------------------------------------------------------------------------------------
# PEFT's torch layouts


def _same(a):
    return a


def _t(a):
    return a.T


def kernel_to_torch(a):
    """A conv kernel ``[*k, in, out]`` as torch's ``[out, in, *k]``."""
    nd = a.ndim - 2
    return a.transpose((nd + 1, nd, *range(nd)))


def kernel_from_torch(t):
    """A torch conv weight ``[out, in, *k]`` as Flax's ``[*k, in, out]``."""
    nd = t.ndim - 2
    return t.transpose((*range(2, nd + 2), 1, 0))


def torch_layout(kind: str, n_spatial: int = 0) -> dict:
    """``{weight name: (PEFT file suffix, to_torch, from_torch)}`` of LoRA's weights on a layer.

    ``kind`` is ``"embed"``, ``"conv"`` (with ``n_spatial`` kernel axes) or anything else for a
    linear map, the multi-axis layers flattened to ``[n_in, n_out]``. The converters work on
    NumPy and JAX arrays alike.
    """
    if kind == "embed":
        return {"lora_A": ("lora_embedding_A", _t, _t), "lora_B": ("lora_embedding_B", _t, _t),
                "lora_magnitude_vector": ("lora_magnitude_vector", _same, _same)}
    if kind == "conv":
        ones = (1,) * n_spatial
        return {
            "lora_A": ("lora_A.weight", kernel_to_torch, kernel_from_torch),
            "lora_B": ("lora_B.weight", lambda b: b.T.reshape(b.T.shape + ones), lambda t: t.reshape(t.shape[:2]).T),
            "lora_B_bias": ("lora_B.bias", _same, _same),
            "lora_magnitude_vector": ("lora_magnitude_vector", lambda m: m.reshape((1, -1) + ones),
                                      lambda t: t.reshape(-1)),
        }
    return {
        "lora_A": ("lora_A.weight", _t, _t),
        "lora_B": ("lora_B.weight", _t, _t),
        "lora_B_bias": ("lora_B.bias", _same, _same),
        "lora_magnitude_vector": ("lora_magnitude_vector", _same, _same),
        "lora_diag": ("lora_diag", _same, _same),  # KaSA's
        "lora_velora_embed": ("lora_velora_embed", _same, _same),  # VeLoRA's projection
    }
