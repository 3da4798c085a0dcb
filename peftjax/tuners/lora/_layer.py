"""LoRA and DoRA layers for Flax NNX, by swapping a layer's class in place.

A targeted ``nnx.Linear`` keeps its ``kernel`` and ``bias`` at the same paths and gains sibling
adapter weights, one entry per adapter name (``q_proj/lora_A/default``). Its forward adds
``s * (dropout(x) @ A) @ B`` to the frozen ``x @ W``; the merged ``W + s * A @ B`` is only ever
built by :func:`merge`, for inference and export.

Layouts are Flax's: ``A`` is ``[in, r]`` and ``B`` is ``[r, out]`` (PEFT stores the transposes).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdapterDictLayer, AdapterLayer, LoraParam, mixin_subclass


class LoraCache(nnx.Variable):
    """Non-trainable state kept by a merge (DoRA's weight norm), needed to unmerge."""


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
    """

    r: int
    alpha: float
    scaling: float
    dropout: float = 0.0
    use_dora: bool = False
    lora_bias: bool = False

    @classmethod
    def for_target(cls, config, name: str) -> "LoraSpec":
        """The settings ``config`` gives the target ``name`` (its rank and alpha patterns applied)."""
        r, alpha, scaling = config.scaling_for(name)
        return cls(r=r, alpha=alpha, scaling=scaling, dropout=float(config.lora_dropout),
                   use_dora=bool(config.use_dora), lora_bias=bool(config.lora_bias))


def kaiming_uniform(key, shape, fan_in: int, dtype=jnp.float32):
    """PyTorch's ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def canonical_init(init):
    """``init_lora_weights`` as the layers compare it: PEFT matches ``"gaussian"`` and ``"olora"``
    case-insensitively (``"Gaussian"``, ``"OLoRA"`` work there), every other string exactly."""
    if isinstance(init, str) and init.lower() in ("gaussian", "olora"):
        return init.lower()
    return init


def decomposes(init) -> bool:
    """Whether ``init`` (PiSSA, randomized PiSSA, OLoRA) rewrites the base weight."""
    return isinstance(init, str) and canonical_init(init).startswith(("pissa", "olora"))


def init_factors(key, kind: str, init, in_features: int, out_features: int, r: int):
    """Initial ``(A, B)`` in Flax layout, following PEFT's ``reset_lora_parameters``."""
    init = canonical_init(init)
    ka, kb = jax.random.split(key)
    if kind == "embed":  # A: [num, r], B: [r, dim]
        if init is False:
            return jax.random.normal(ka, (in_features, r)), jax.random.normal(kb, (r, out_features))
        return jnp.zeros((in_features, r)), jax.random.normal(kb, (r, out_features))
    if init is False:  # nn.Linear's own init for both factors: not a no-op adapter
        return kaiming_uniform(ka, (in_features, r), in_features), kaiming_uniform(kb, (r, out_features), r)
    if init == "gaussian":
        return jax.random.normal(ka, (in_features, r)) / r, jnp.zeros((r, out_features))
    return kaiming_uniform(ka, (in_features, r), in_features), jnp.zeros((r, out_features))


def _same(x):
    return x


def unit_norm(w: jax.Array) -> jax.Array:
    """The norm of each output unit's weights (last axis) over every other axis: DoRA's ``‖W‖``.

    On a ``[in, out]`` kernel this is PEFT's row norm of ``W[out, in]``.
    """
    return jnp.linalg.norm(w.astype(jnp.float32).reshape(-1, w.shape[-1]), axis=0)


class LoraLayer(AdapterDictLayer):
    """Mixin with what every LoRA layer kind shares: its weight containers, file protocol and checks.

    The bookkeeping (active, merged, disabled adapters) is the base layer's. Mixins are not real
    bases of the swapped class (see :func:`mixin_subclass`), so their methods reach the original
    layer through ``self._peftjax_base``, never ``super()``.
    """

    method_name = "LoRA"
    param_type = LoraParam
    weight_dicts = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector")
    cache_dicts = ("lora_cache",)
    lora_kind: str = "linear"

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        """Raises for settings this layer kind cannot take; called before anything is changed."""

    def _describe(self, name: str) -> str:
        return f"r={self.spec(name).r}"


class KernelLora(LoraLayer):
    """LoRA on a layer with a ``kernel`` whose last axis is the output: forward, DoRA and merge.

    Shared by ``nnx.Linear`` and ``nnx.Conv``; a subclass says how the factors are built
    (:meth:`_init_factors`), how ``A`` and ``B`` act on an input (:meth:`_branch`), how the
    base kernel acts on one (:meth:`_apply_kernel`, for DoRA under dropout) and how ``A``, ``B``
    form a kernel-shaped delta (:meth:`delta_weight`).
    """

    def _init_factors(self, spec: LoraSpec, key, init) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def _branch(self, h: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _apply_kernel(self, h: jax.Array, w: jax.Array) -> jax.Array:
        raise NotImplementedError

    def delta_weight(self, name: str, spec: LoraSpec | None = None) -> jax.Array:
        raise NotImplementedError

    def add_lora(self, name: str, spec: LoraSpec, key, init=True) -> None:
        self._check_new(name)
        # the kernel before init: PiSSA/OLoRA rewrite it, and DoRA's magnitude has always been
        # taken from the original (PEFT takes it from the residual; to settle when PiSSA+DoRA is tested)
        w = self.kernel.get_value()
        a, b = self._init_factors(spec, key, init)
        self.lora_A[name] = LoraParam(a.astype(jnp.float32))
        self.lora_B[name] = LoraParam(b.astype(jnp.float32))
        if spec.lora_bias:
            self.lora_B_bias[name] = LoraParam(jnp.zeros((w.shape[-1],), jnp.float32))
        if spec.use_dora:
            self.lora_magnitude_vector[name] = LoraParam(unit_norm(w + self.delta_weight(name, spec)))
        self._add_spec(name, spec)

    def __call__(self, inputs, *args, **kwargs):
        y = self._peftjax_base.__call__(self, inputs, *args, **kwargs)
        for name, spec in self._live_adapters():
            a, b = self.lora_A[name].get_value(), self.lora_B[name].get_value()
            h = apply_dropout(inputs, spec.dropout, f"{self.adapter_path}/{name}").astype(a.dtype)
            lora = self._branch(h, a, b)
            if spec.lora_bias:
                lora = lora + self.lora_B_bias[name].get_value()
            if spec.use_dora:
                y = y + self._dora_extra(name, spec, inputs, h, y, lora).astype(y.dtype)
            else:
                y = y + (spec.scaling * lora).astype(y.dtype)
        return y

    def _dora_extra(self, name, spec, x, h, y, lora):
        w = self.kernel.get_value()
        norm = jax.lax.stop_gradient(unit_norm(w + self.delta_weight(name, spec)))
        factor = self.lora_magnitude_vector[name].get_value() / norm
        if spec.dropout > 0 and h is not x:
            base = self._apply_kernel(h, w)  # PEFT recomputes the base layer on the dropped-out input
        else:
            bias = self.bias.get_value() if self.bias is not None else 0.0
            base = y.astype(jnp.float32) - bias
        return (factor - 1) * base + factor * spec.scaling * lora

    def merge_adapter(self, name: str) -> None:
        spec = self.spec(name)
        w = self.kernel.get_value()
        merged = w.astype(jnp.float32) + self.delta_weight(name, spec)
        if spec.use_dora:
            norm = unit_norm(merged)
            self.lora_cache[name] = LoraCache(norm)
            merged = merged * (self.lora_magnitude_vector[name].get_value() / norm)
        self.kernel.set_value(merged.astype(w.dtype))
        if spec.lora_bias:
            bias = self.bias.get_value()
            self.bias.set_value((bias + spec.scaling * self.lora_B_bias[name].get_value()).astype(bias.dtype))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        spec = self.spec(name)
        w = self.kernel.get_value().astype(jnp.float32)
        if spec.use_dora:
            w = w * (self.lora_cache[name].get_value() / self.lora_magnitude_vector[name].get_value())
            del self.lora_cache[name]
        self.kernel.set_value((w - self.delta_weight(name, spec)).astype(self.kernel.get_value().dtype))
        if spec.lora_bias:
            bias = self.bias.get_value()
            self.bias.set_value((bias - spec.scaling * self.lora_B_bias[name].get_value()).astype(bias.dtype))
        self._mark_merged(name, False)


class LoraLinear(KernelLora):
    """LoRA on ``nnx.Linear`` and its subclasses (GPT-2's ``Conv1D`` included)."""

    def _init_factors(self, spec: LoraSpec, key, init) -> tuple[jax.Array, jax.Array]:
        w = self.kernel.get_value()
        if decomposes(init):
            a, b, w_res = _decompose(init, w, spec, key)
            self.kernel.set_value(w_res.astype(w.dtype))
            return a, b
        return init_factors(key, "linear", init, w.shape[0], w.shape[1], spec.r)

    def peft_layout(self, name: str | None = None):  # LoRA's layout is the same for every adapter
        t = jnp.transpose
        return {
            "lora_A.weight": (self.lora_A, t, t),
            "lora_B.weight": (self.lora_B, t, t),
            "lora_B.bias": (self.lora_B_bias, _same, _same),
            "lora_magnitude_vector": (self.lora_magnitude_vector, _same, _same),
        }

    def delta_weight(self, name: str, spec: LoraSpec | None = None) -> jax.Array:
        """``s * A @ B`` in the kernel's ``[in, out]`` layout."""
        spec = spec or self.spec(name)
        return spec.scaling * (self.lora_A[name].get_value() @ self.lora_B[name].get_value())

    def _branch(self, h, a, b):
        # on [tokens, in]: the gradients of A and B are then plain matmuls over the tokens; a
        # batched [b, s, in] input makes XLA:CPU transpose activations for them (~13% of a step)
        return ((h.reshape(-1, h.shape[-1]) @ a) @ b).reshape(*h.shape[:-1], b.shape[-1])

    def _apply_kernel(self, h, w):
        return h.astype(w.dtype) @ w


class LoraEmbed(LoraLayer):
    """LoRA on ``nnx.Embed``: ``A`` is ``[num_embeddings, r]``, looked up by id; no dropout."""

    lora_kind = "embed"

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        if use_dora or lora_bias:
            raise NotImplementedError(f"{path}: DoRA and lora_bias on embeddings are not supported")
        if isinstance(init, str) and canonical_init(init) != "gaussian":
            raise NotImplementedError(f"{path}: init_lora_weights={init!r} is not supported on embeddings")

    def add_lora(self, name: str, spec: LoraSpec, key, init=True) -> None:
        self._check_new(name)
        self.check_lora(self.adapter_path, use_dora=spec.use_dora, lora_bias=spec.lora_bias, init=init)
        e = self.embedding.get_value()
        a, b = init_factors(key, "embed", init, e.shape[0], e.shape[1], spec.r)
        self.lora_A[name] = LoraParam(a.astype(jnp.float32))
        self.lora_B[name] = LoraParam(b.astype(jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str | None = None):  # LoRA's layout is the same for every adapter
        t = jnp.transpose
        return {"lora_embedding_A": (self.lora_A, t, t), "lora_embedding_B": (self.lora_B, t, t)}

    def delta_weight(self, name: str, spec: LoraSpec | None = None) -> jax.Array:
        spec = spec or self.spec(name)
        return spec.scaling * (self.lora_A[name].get_value() @ self.lora_B[name].get_value())

    def __call__(self, inputs, *args, **kwargs):
        y = self._peftjax_base.__call__(self, inputs, *args, **kwargs)
        for name, spec in self._live_adapters():
            a, b = self.lora_A[name].get_value(), self.lora_B[name].get_value()
            rows = jnp.take(a, jnp.asarray(inputs), axis=0)
            y = y + (spec.scaling * (rows @ b)).astype(y.dtype)
        return y

    def merge_adapter(self, name: str) -> None:
        e = self.embedding.get_value()
        self.embedding.set_value((e.astype(jnp.float32) + self.delta_weight(name)).astype(e.dtype))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        e = self.embedding.get_value()
        self.embedding.set_value((e.astype(jnp.float32) - self.delta_weight(name)).astype(e.dtype))
        self._mark_merged(name, False)


def _decompose(init: str, w: jax.Array, spec: LoraSpec, key: jax.Array):
    """PiSSA (SVD) or OLoRA (QR) factors of ``W`` and the residual base ``W - s * A @ B``.

    PEFT's ``pissa_init`` / ``olora_init``, computed in PEFT's ``[out, in]`` orientation and
    returned in Flax layout. ``"pissa_niter_<N>"`` takes the top ``r`` singular triplets from
    :func:`svd_lowrank` (``key`` draws its test matrix) instead of the full SVD. Whatever the
    approximation, the residual is taken against the factors actually built, so
    ``residual + s * A @ B`` is ``W`` to rounding and the adapted model starts as the base model.
    """
    wt = w.astype(jnp.float32).T  # [out, in]
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


def lora_class_for(module: nnx.Module) -> type | None:
    """The LoRA subclass of ``type(module)``, or ``None`` when the layer type is not supported."""
    if isinstance(module, LoraLayer):
        return type(module)
    if isinstance(module, AdapterLayer):  # carries another method's adapter (IA³, bottleneck, ...)
        return None
    if isinstance(module, nnx.Linear):
        return mixin_subclass(type(module), LoraLinear, "Lora")
    if isinstance(module, nnx.Embed):
        return mixin_subclass(type(module), LoraEmbed, "Lora")
    from peftjax.tuners.lora._layer_general import LoraConv, LoraEinsum, LoraLinearGeneral  # imports this module

    for layer, mixin in ((nnx.LinearGeneral, LoraLinearGeneral), (nnx.Einsum, LoraEinsum), (nnx.Conv, LoraConv)):
        if isinstance(module, layer):  # nnx.ConvTranspose is not an nnx.Conv: it stays unsupported
            return mixin_subclass(type(module), mixin, "Lora")
    return None


SUPPORTED_LAYERS = (
    "nnx.Linear (and subclasses such as GPT-2's Conv1D)",
    "nnx.Embed",
    "nnx.LinearGeneral",
    "nnx.Einsum",
    "nnx.Conv",
)
