"""LoRA and DoRA layers for Flax NNX, by swapping a layer's class in place.

A targeted ``nnx.Linear`` keeps its ``kernel`` and ``bias`` at the same paths and gains sibling
adapter weights, one entry per adapter name (``q_proj/lora_A/default``). Its forward adds
``s * (dropout(x) @ A) @ B`` to the frozen ``x @ W``; the merged ``W + s * A @ B`` is only ever
built by :func:`merge`, for inference and export.

Layouts are Flax's: ``A`` is ``[in, r]`` and ``B`` is ``[r, out]`` (PEFT stores the transposes).
:class:`LoraLayer` holds what every layer kind shares (init, forward, DoRA, merge, file layout)
on top of the pure functions of ``_math.py``, which the Linen path uses too; a layer kind says
how its weight reads as ``[n_in, n_out]`` and how ``A`` and ``B`` act on an input.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype

from peftjax.nn._broadcast import along_last
from peftjax.nn._dropout import apply_dropout
from peftjax.nn._partitioned import is_partitioned
from peftjax.quantization import QuantizedLinear
from peftjax.tuners.base import (
    AdapterDictLayer,
    AdapterLayer,
    FrozenAdapterParam,
    LoraParam,
    adding_from_file,
    mixin_subclass,
)
from peftjax.tuners.base._rows import per_row, rows_of
from peftjax.tuners.lora._alora import activation_mask, current_offsets
from peftjax.tuners.lora._scalings import active_lora_scalings
from peftjax.tuners.lora._math import (
    LoraSpec,
    arrow_route,
    block_diagonal,
    block_diagonal_branch,
    block_diagonal_layout,
    check_init,
    delta,
    dora_factor,
    dora_output,
    init_weights,
    is_astra,
    is_corda,
    is_loftq,
    is_loraga,
    is_mica,
    joint_matmul,
    merged_weight,
    torch_layout,
    unmerged_weight,
    velora_branch,
    velora_projection,
)


class LoraCache(nnx.Variable):
    """Non-trainable state kept by a merge (DoRA's weight norm), needed to unmerge."""


class VeloraProjection(nnx.Variable):
    """VeLoRA's projection vector: frozen, saved with the adapter (a buffer in PEFT)."""


class LoraLayer(AdapterDictLayer):
    """Mixin with what every LoRA layer kind shares: init, forward, DoRA, merge and the file layout.

    A layer kind provides :meth:`_branch` (how ``A`` and ``B`` act on an input), and where its
    weight is not a plain ``[in, out]`` kernel, :meth:`_to_2d` / :meth:`_from_2d` and
    :meth:`_a_shape`; :meth:`_apply_kernel` is needed only where DoRA is allowed. The
    bookkeeping (active, merged, disabled adapters) is the base layer's. Mixins are not real
    bases of the swapped class (see :func:`mixin_subclass`), so their methods reach the original
    layer through ``self._peftjax_base``, never ``super()``.
    """

    method_name = "LoRA"
    param_type = LoraParam
    weight_dicts = ("lora_A", "lora_B", "lora_B_bias", "lora_magnitude_vector", "lora_diag")
    cache_dicts = ("lora_cache", "arrow_prototypes", "lora_velora_embed")
    merge_cache_dicts = ("lora_cache",)
    # an Arrow router's state (``tuners.lora._arrow``): the experts its prototypes were built over
    adapter_state_attrs = AdapterDictLayer.adapter_state_attrs + ("arrow_experts", "arrow_gks_done")
    # "linear", "embed", "conv" or "general": what init it takes and its PEFT file layout
    lora_kind: str = "linear"
    weight_attr: str = "kernel"
    supports_adapter_rows = True  # a different adapter per batch row (PEFT's ``adapter_names``)

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        """Raises for settings this layer kind cannot take; called before anything is changed.

        ``self`` may still be the user's layer, before its class is swapped (injection checks
        every target first), so the kind is looked up rather than read from ``self``.
        """
        check_init(lora_class_for(self).lora_kind, init, path)
        if isinstance(self, QuantizedLinear) and is_loftq(init):
            raise TypeError(f"{path}: init_lora_weights='loftq' quantizes the float base weight itself; load the "
                            "float checkpoint (no quantization_config), initialize LoftQ, save the rewritten base, "
                            "then load that in 4 or 8 bits with the adapter.")
        if isinstance(self, QuantizedLinear) and is_mica(init):  # PEFT's message: its SVD needs a float weight
            raise TypeError(f"{path}: Please initialize MiCA under float32, float16, or bfloat16 (init_lora_weights="
                            f"{init!r} takes the SVD of the base weight, which is quantized here).")
        if isinstance(self, QuantizedLinear) and init == "eva":
            raise NotImplementedError(f"{path}: init_lora_weights='eva' on a quantized layer is not implemented in "
                                      "peftjax; run EVA on the float model")
        if isinstance(self, QuantizedLinear) and init not in (True, False, "gaussian", "orthogonal", "nora"):
            init = "corda" if is_corda(init) else "astra" if is_astra(init) else "lora_ga" if is_loraga(init) else init
            raise TypeError(f"{path}: init_lora_weights={init!r} rewrites the base weight, which is quantized here. "
                            "Please initialize it under float32, float16, or bfloat16. Subsequently, "
                            "re-quantize the residual model to help minimize quantization errors.")

    def _describe(self, name: str) -> str:
        return f"r={self.spec(name).r}"

    # -- the layer kind's view of its weight and of the factors
    def _to_2d(self, w: jax.Array) -> jax.Array:
        """The base weight as ``[n_in, n_out]``."""
        return w

    def _from_2d(self, w2: jax.Array) -> jax.Array:
        """The inverse of :meth:`_to_2d`."""
        return w2

    def _a_shape(self, n_in: int, r: int) -> tuple[int, ...]:
        return (n_in, r)

    def _branch(self, h: jax.Array, a: jax.Array, b: jax.Array, *args, **kwargs) -> jax.Array:
        raise NotImplementedError

    def _apply_kernel(self, h: jax.Array, w: jax.Array) -> jax.Array:
        raise NotImplementedError

    def _n_spatial(self) -> int:
        return 0

    # -- shared
    def add_lora(self, name: str, spec: LoraSpec, key, init=True) -> None:
        self._check_new(name)
        self.check_lora(self.adapter_path, use_dora=spec.use_dora, lora_bias=spec.lora_bias, init=init)
        var = getattr(self, self.weight_attr)
        w = var.get_value()
        kind = "embed" if self.lora_kind == "embed" else "linear"
        if is_mica(init) and adding_from_file():  # the file holds both factors: no SVD to overwrite
            init = True
        weights, residual = init_weights(key, kind, init, self._to_2d(w), spec)
        if residual is not None:  # PiSSA/OLoRA leave the residual as the base weight
            var.set_value(self._from_2d(residual).astype(w.dtype))
        if spec.block_diagonal is None or spec.block_diagonal[0] != "A":  # blocks: [nblocks, n_in / nblocks, ...]
            weights["lora_A"] = weights["lora_A"].reshape(self._a_shape(*weights["lora_A"].shape))
        for key_name, value in weights.items():
            frozen = key_name == "lora_B" and spec.freeze_b
            getattr(self, key_name)[name] = (FrozenAdapterParam if frozen else LoraParam)(value)
        if spec.velora is not None:
            self.lora_velora_embed[name] = VeloraProjection(velora_projection(key, self._to_2d(w).shape[0],
                                                                             spec.velora))
        self._add_spec(name, spec)

    def frozen_adapter_dicts(self, name: str) -> tuple:
        return (self.lora_B,) if self.spec(name).freeze_b else ()

    def peft_layout(self, name: str | None = None):
        layout = torch_layout(self.lora_kind, self._n_spatial())
        bd = None if name is None or name not in self.lora_A else self.spec(name).block_diagonal
        if bd is not None:  # a BD-LoRA adapter's block-diagonal factor: PEFT's BlockDiagonalLinear weight
            layout.update(block_diagonal_layout(*bd))
        return {suffix: (getattr(self, key), to, back) for key, (suffix, to, back) in layout.items()}

    def dense_factors(self, name: str) -> tuple[jax.Array, jax.Array]:
        """Adapter ``name``'s ``(A [n_in, r], B [r, n_out])`` as dense matrices (a BD-LoRA factor
        held in blocks is laid out on its diagonal)."""
        a, b = self.lora_A[name].get_value(), self.lora_B[name].get_value()
        spec = self.spec(name)
        if spec.kasa is not None:  # KaSA's diagonal folded into A's columns
            return a * self.lora_diag[name].get_value().astype(a.dtype)[None, :], b
        bd = spec.block_diagonal
        if bd is None:
            return a, b
        return (block_diagonal(a), b) if bd[0] == "A" else (a, block_diagonal(b))

    def delta_weight(self, name: str, spec: LoraSpec | None = None) -> jax.Array:
        """``s * A @ B`` in the base weight's shape (float32)."""
        spec = spec or self.spec(name)
        return self._from_2d(delta(*self.dense_factors(name), spec.scaling))

    def __call__(self, inputs, *args, **kwargs):
        y = self._peftjax_base.__call__(self, inputs, *args, **kwargs)
        weighed = active_lora_scalings()
        if weighed is not None and getattr(self, "xlora_index", None) is not None:
            return self._weighed(weighed, inputs, y, *args, **kwargs)
        mixed = rows_of(self)
        if mixed is not None:
            return self._mixed_batch(*mixed, inputs, y, *args, **kwargs)
        for name, spec in self._live_adapters():
            if spec.arrow is not None:
                y = y + self._arrow(name, spec, inputs).astype(y.dtype)
                continue
            a, b = self.lora_A[name].get_value(), self.lora_B[name].get_value()
            if self.lora_kind == "embed":  # PEFT applies no dropout to embeddings
                h, dropped = inputs, False
            else:
                h = self._dropped(inputs, name, spec)
                dropped = h is not inputs
                h = h.astype(a.dtype)
            if spec.block_diagonal is not None:
                lora = block_diagonal_branch(h, a, b, spec.block_diagonal[0])
            elif spec.kasa is not None:  # ((h A) * diag) B
                lora = self._branch(h, *self.dense_factors(name), *args, **kwargs)
            elif spec.velora is not None:
                lora = velora_branch(h, a, b, self.lora_velora_embed[name].get_value(), spec.velora)
            else:
                lora = self._branch(h, a, b, *args, **kwargs)
            if spec.lora_bias:
                lora = lora + along_last(self.lora_B_bias[name].get_value(), lora.ndim)
            if spec.alora is not None:  # from the invocation tokens on, nowhere outside an aLoRA model's call
                offsets = (current_offsets() or {}).get(spec.alora)
                if offsets is None:
                    continue
                lora = lora * activation_mask(offsets, inputs.shape)[..., None].astype(lora.dtype)
            if spec.use_dora:
                w = getattr(self, self.weight_attr).get_value()
                factor = dora_factor(self.lora_magnitude_vector[name].get_value(), self._to_2d(w), a, b, spec.scaling)
                if dropped:
                    base = self._apply_kernel(h, w)  # PEFT recomputes the base layer on the dropped-out input
                else:
                    base = y.astype(jnp.float32)
                    if getattr(self, "bias", None) is not None:
                        base = base - along_last(self.bias.get_value(), base.ndim)
                extra = dora_output(along_last(factor, lora.ndim), base, lora, spec.scaling)
            else:
                extra = spec.scaling * lora
            y = y + extra.astype(y.dtype)
        return y

    def arrow_expert_names(self) -> tuple[str, ...]:
        """The adapters an Arrow router on this layer routes over: every other one but the
        GenKnowSub adapters (``gks_<n>``), in the order they were added (PEFT's)."""
        return tuple(n for n, s in self.adapter_specs if s.arrow is None and not re.fullmatch(r"gks_\d+", n))

    def _arrow(self, name: str, spec: LoraSpec, inputs):
        """Router ``name``'s update: each token over the experts' factors (see ``arrow_route``)."""
        experts = self.arrow_expert_names()
        if name not in self.arrow_prototypes or experts != getattr(self, "arrow_experts", None):
            raise ValueError(f"{self.adapter_path}: the Arrow router {name!r} was built over "
                             f"{list(getattr(self, 'arrow_experts', ()))}, the layer now has {list(experts)}; add, "
                             "load and delete adapters through the PeftModel, which rebuilds the router")
        a = jnp.stack([self.dense_factors(n)[0] for n in experts])  # [E, in, r]
        b = jnp.stack([self.dense_factors(n)[1] for n in experts])  # [E, r, out]
        scales = jnp.asarray([self.spec(n).scaling for n in experts], a.dtype)
        x = inputs.astype(a.dtype).reshape(-1, inputs.shape[-1])
        prototypes = self.arrow_prototypes[name].get_value().astype(a.dtype)
        delta = arrow_route(x, prototypes, a, b, scales, spec.arrow[0], spec.arrow[1])
        delta = apply_dropout(delta, spec.dropout, f"{self.adapter_path}/{name}")  # PEFT drops the update out
        return delta.reshape(*inputs.shape[:-1], delta.shape[-1])

    def _weighed(self, weighed, inputs, y, *args, **kwargs):
        """X-LoRA's forward: every adapter of the block this layer holds, its input scaled per token
        (see ``peftjax.tuners.lora._scalings``)."""
        if self.adapter_disabled:
            return y
        s = weighed.for_layer(self.xlora_index, inputs.shape[:-1])
        for j, name in enumerate(weighed.adapters):
            if name not in self.lora_A:
                continue
            if name in self.adapter_merged:
                raise ValueError(f"{self.adapter_path}: X-LoRA cannot weigh merged adapter {name!r}; unmerge it first")
            spec = self.spec(name)
            if spec.alora is not None:
                raise NotImplementedError(f"{self.adapter_path}: X-LoRA over an aLoRA adapter ({name!r}) is not "
                                          "supported")
            a, b = self.dense_factors(name)
            h = inputs.astype(a.dtype) * s[..., j:j + 1].astype(a.dtype)
            lora = self._branch(self._dropped(h, name, spec), a, b, *args, **kwargs)
            y = y + (lora * (spec.scaling * weighed.weight)).astype(y.dtype)
        return y

    def _dropped(self, inputs, name: str, spec: LoraSpec):
        """Adapter ``name``'s input: ``inputs`` with its dropout (its mask keyed by the layer's path)."""
        return apply_dropout(inputs, spec.dropout, f"{self.adapter_path}/{name}")

    def _mixed_batch(self, rows, names, inputs, y, *args, **kwargs):
        """Row ``i`` adds adapter ``names[rows[i]]`` (none past the end): one gathered matmul per factor.

        Every adapter is padded to the largest rank with zeros, which adds nothing; an adapter
        this layer lacks is all zeros. No dropout: mixed batches are for inference, as in PEFT.
        """
        if not self._serves_rows():
            return y
        specs = dict(self.adapter_specs)
        present = [n for n in names if n in specs]
        if not present:
            return y
        if any(specs[n].use_dora for n in present):
            raise ValueError("Cannot pass `adapter_names` when DoRA is enabled.")
        if any(specs[n].alora is not None for n in present):
            raise NotImplementedError(f"{self.adapter_path}: `adapter_names` rows with an aLoRA adapter are not "
                                      "supported; activate it for the whole batch")
        if any(specs[n].arrow is not None for n in present):
            raise NotImplementedError(f"{self.adapter_path}: `adapter_names` rows with an Arrow router are not "
                                      "supported; activate the router for the whole batch")
        r = max(specs[n].r for n in present)
        dense = {n: self.dense_factors(n) for n in present}  # BD-LoRA's blocks on their diagonal
        a0, b0 = dense[present[0]]
        zeros_a, zeros_b = jnp.zeros(a0.shape[:-1] + (r,), a0.dtype), jnp.zeros((r, b0.shape[-1]), b0.dtype)

        def pad(v, axis):
            return jnp.pad(v, [(0, r - v.shape[axis]) if i == axis % v.ndim else (0, 0) for i in range(v.ndim)])

        a_rows = jnp.stack([pad(dense[n][0], -1) if n in specs else zeros_a for n in names] + [zeros_a])[rows]
        b_rows = jnp.stack([pad(dense[n][1], 0) if n in specs else zeros_b for n in names] + [zeros_b])[rows]
        scaling = jnp.asarray([specs[n].scaling if n in specs else 0.0 for n in names] + [0.0], jnp.float32)[rows]
        h = inputs if self.lora_kind == "embed" else inputs.astype(a0.dtype)
        lora = jax.vmap(lambda h1, a1, b1: self._branch(h1[None], a1, b1, *args, **kwargs)[0])(h, a_rows, b_rows)
        if any(specs[n].lora_bias for n in present):
            zeros = jnp.zeros((b0.shape[-1],), jnp.float32)
            bias = jnp.stack([self.lora_B_bias[n].get_value() if n in specs and specs[n].lora_bias else zeros
                              for n in names] + [zeros])[rows]
            lora = lora + bias.reshape(rows.shape + (1,) * (lora.ndim - 2) + bias.shape[-1:])
        return y + (per_row(rows, scaling, lora.ndim) * lora).astype(y.dtype)

    def merge_adapter(self, name: str) -> None:
        spec = self.spec(name)
        if spec.arrow is not None:  # PEFT's: a per-token mixture has no single merged weight
            raise RuntimeError("Cannot merge an active Arrow router adapter. Remove it first.")
        if spec.alora is not None:  # PEFT's: the update depends on where the invocation tokens are
            raise NotImplementedError(f"{self.adapter_path}: aLoRA does not support merging.")
        var = getattr(self, self.weight_attr)
        w = var.get_value()
        magnitude = self.lora_magnitude_vector[name].get_value() if spec.use_dora else None
        merged, norm = merged_weight(self._to_2d(w), *self.dense_factors(name), spec.scaling, magnitude)
        if norm is not None:
            self.lora_cache[name] = LoraCache(norm)
        var.set_value(self._from_2d(merged).astype(w.dtype))
        self._shift_bias(name, spec, +1)
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        spec = self.spec(name)
        var = getattr(self, self.weight_attr)
        w = var.get_value()
        magnitude, norm = None, None
        if spec.use_dora:
            magnitude, norm = self.lora_magnitude_vector[name].get_value(), self.lora_cache[name].get_value()
            del self.lora_cache[name]
        restored = unmerged_weight(self._to_2d(w), *self.dense_factors(name), spec.scaling, magnitude, norm)
        var.set_value(self._from_2d(restored).astype(w.dtype))
        self._shift_bias(name, spec, -1)
        self._mark_merged(name, False)

    def _shift_bias(self, name: str, spec: LoraSpec, sign: int) -> None:
        if spec.lora_bias:
            bias = self.bias.get_value()
            self.bias.set_value((bias + sign * spec.scaling * self.lora_B_bias[name].get_value()).astype(bias.dtype))


class LoraLinear(LoraLayer):
    """LoRA on ``nnx.Linear`` and its subclasses (GPT-2's ``Conv1D`` included).

    On a plain ``nnx.Linear`` whose live adapters are plain LoRA (no DoRA, no ``lora_bias``, one
    dtype throughout), the output is one matmul, ``[x, s x A] @ [W; B]`` (:func:`joint_matmul`):
    a single buffer where the sum of two products kept two. Elsewhere (a mesh, mixed batches,
    DoRA, another base call) the layer adds the branch to the base output.
    """

    status_module_type = "lora.Linear"  # PEFT's layer class (GPT-2's Conv1D gets it too)
    bnb_status_prefix = "lora."  # PEFT's own bitsandbytes layer: <prefix>Linear4bit

    def __call__(self, inputs, *args, **kwargs):
        live = self._joint_adapters(inputs, args, kwargs)
        if not live:
            return LoraLayer.__call__(self, inputs, *args, **kwargs)
        x = inputs.reshape(-1, inputs.shape[-1])
        us, bs = [], []
        for name, spec in live:
            h = self._dropped(inputs, name, spec)
            us.append(spec.scaling * (h.reshape(x.shape) @ self.lora_A[name].get_value()))
            bs.append(self.lora_B[name].get_value())
        u, b = (us[0], bs[0]) if len(us) == 1 else (jnp.concatenate(us, -1), jnp.concatenate(bs, 0))
        kernel = self.kernel.get_value()
        y = joint_matmul(x, kernel, u, b).reshape(*inputs.shape[:-1], kernel.shape[-1])
        if self.bias is not None:
            y = y + along_last(self.bias.get_value(), y.ndim)
        return y

    def _joint_adapters(self, inputs, args, kwargs) -> list:
        """The live adapters when the joint matmul computes exactly what the base call plus the
        branches would (see the class docstring); otherwise ``[]``."""
        if (args or kwargs or is_partitioned() or self._peftjax_base.__call__ is not nnx.Linear.__call__
                or rows_of(self) is not None or active_lora_scalings() is not None):
            return []
        dtype = inputs.dtype
        if ((self.dtype is not None and jnp.dtype(self.dtype) != dtype) or self.precision is not None
                or self.preferred_element_type is not None or self.dot_general is not jax.lax.dot_general
                or self.promote_dtype is not promote_dtype):
            return []
        live = list(self._live_adapters())
        if not live or self.kernel.get_value().dtype != dtype or (
                self.bias is not None and self.bias.get_value().dtype != dtype):
            return []
        for name, spec in live:
            if (spec.use_dora or spec.lora_bias or spec.arrow is not None or spec.block_diagonal is not None
                    or spec.kasa is not None or spec.velora is not None or spec.alora is not None
                    or self.lora_A[name].get_value().dtype != dtype or self.lora_B[name].get_value().dtype != dtype):
                return []
        return live

    def _branch(self, h, a, b):
        # on [tokens, in]: the gradients of A and B are then plain matmuls over the tokens; a
        # batched [b, s, in] input makes XLA:CPU transpose activations for them (~13% of a step)
        return ((h.reshape(-1, h.shape[-1]) @ a) @ b).reshape(*h.shape[:-1], b.shape[-1])

    def _apply_kernel(self, h, w):
        return h.astype(w.dtype) @ w


class LoraEmbed(LoraLayer):
    """LoRA on ``nnx.Embed``: ``A`` is ``[num_embeddings, r]``, looked up by id; no dropout.

    DoRA (PEFT's ``DoraEmbeddingLayer``) reads the table ``[num_embeddings, dim]`` as ``[n_in, n_out]``:
    the magnitude is one entry per embedding dimension, the norm of that column of ``W + s A B``
    over the vocabulary, and the output is ``f * (embed(W) + s * embed(A) @ B)`` with ``f = m / norm``.
    """

    lora_kind = "embed"
    weight_attr = "embedding"
    status_module_type = "lora.Embedding"  # PEFT's layer class

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        if lora_bias:  # PEFT refuses it too (an embedding has no bias)
            raise NotImplementedError(f"{path}: lora_bias on embeddings is not supported")
        check_init("embed", init, path)

    def _branch(self, ids, a, b):
        out = jnp.take(a, jnp.asarray(ids), axis=0) @ b
        scale = getattr(self, "embed_scale", None)  # a scaled lookup (Gemma's): PEFT scales the adapter's rows too
        if scale is None:
            return out
        return out * jnp.asarray(scale, self.embedding.get_value().dtype).astype(out.dtype)


def lora_class_for(module: nnx.Module) -> type | None:
    """The LoRA subclass of ``type(module)``, or ``None`` when the layer type is not supported."""
    if isinstance(module, LoraLayer):  # not one that carries LoRA on its parameters (PEFT refuses that too)
        return None if module.lora_kind == "param" else type(module)
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
