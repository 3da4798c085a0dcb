"""LoRA on Flax NNX's multi-axis layers: ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv``.

Each kernel is read as a linear map from the axes the layer contracts to the axes it produces,
and factored through rank ``r`` like :class:`~peftjax.tuners.lora.LoraLinear`:

* ``LinearGeneral``, kernel ``in_shape + out_shape``: ``A [prod(in), r]``, ``B [r, prod(out)]``.
* ``Einsum``, kernel axes split into contracted (shared with the input) and output axes:
  ``A [prod(contracted), r]``, ``B [r, prod(output)]``, each in the kernel's axis order.
* ``Conv``, kernel ``[*k, in, out]``: ``A [*k, in, r]`` is a convolution with the layer's own
  strides, padding and dilations, ``B [r, out]`` a 1×1 convolution (a matmul over channels),
  as in PEFT's ``Conv2d`` LoRA.

PEFT files: ``Conv`` uses PEFT's torch layouts (``lora_A.weight [r, in, *k]``,
``lora_B.weight [out, r, 1, ...]``). PEFT has no ``LinearGeneral`` or ``Einsum``; for those,
peftjax writes the flattened 2-D factors in ``nn.Linear``'s layout (``lora_A.weight [r, prod(in)]``,
``lora_B.weight [prod(out), r]``), flattening in the kernel's axis order.

Not supported (``NotImplementedError``): DoRA and ``lora_bias`` on ``LinearGeneral``/``Einsum``;
``LinearGeneral`` with ``batch_axis``; einsum strings whose kernel axes are not all either
contracted or output axes; grouped (``feature_group_count > 1``) or masked convolutions; PiSSA/OLoRA
init on any of the three.
"""

from __future__ import annotations

import math
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import LoraParam, original_class
from peftjax.tuners.lora._layer import KernelLora, LoraLayer, LoraSpec, _same, init_factors


def _init_kind(path: str, init) -> bool | str:
    """The init ``init_factors`` understands; PiSSA/OLoRA need a 2-D weight of PEFT's own layers."""
    if isinstance(init, bool):
        return init
    if isinstance(init, str) and init.lower() == "gaussian":
        return "gaussian"
    raise NotImplementedError(f"{path}: init_lora_weights={init!r} is not supported on this layer type")


class _FlatLora(LoraLayer):
    """Shared by the layers whose kernel is a reshaped/transposed ``[n_in, n_out]`` matrix.

    Subclasses provide ``_flat_features`` and ``_to_kernel``; no DoRA, no ``lora_bias``.
    """

    def _flat_features(self) -> tuple[int, int]:
        raise NotImplementedError

    def _to_kernel(self, flat: jax.Array) -> jax.Array:
        raise NotImplementedError

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        """Raises ``NotImplementedError`` naming ``path`` for what this layer cannot adapt."""
        kind = original_class(self).__name__
        if use_dora or lora_bias:
            raise NotImplementedError(f"{path} ({kind}): DoRA and lora_bias are not supported on this layer type")
        _init_kind(path, init)

    def add_lora(self, name: str, spec: LoraSpec, key, init=True) -> None:
        self._check_new(name)
        self.check_lora(self.adapter_path, use_dora=spec.use_dora, lora_bias=spec.lora_bias, init=init)
        n_in, n_out = self._flat_features()
        a, b = init_factors(key, "linear", _init_kind(self.adapter_path, init), n_in, n_out, spec.r)
        self.lora_A[name] = LoraParam(a.astype(jnp.float32))
        self.lora_B[name] = LoraParam(b.astype(jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str | None = None):  # LoRA's layout is the same for every adapter
        t = jnp.transpose
        return {"lora_A.weight": (self.lora_A, t, t), "lora_B.weight": (self.lora_B, t, t)}

    def delta_weight(self, name: str, spec: LoraSpec | None = None) -> jax.Array:
        """``s * A @ B`` reshaped (and transposed) to the kernel's shape."""
        spec = spec or self.spec(name)
        return self._to_kernel(spec.scaling * (self.lora_A[name].get_value() @ self.lora_B[name].get_value()))

    def merge_adapter(self, name: str) -> None:
        w = self.kernel.get_value()
        self.kernel.set_value((w.astype(jnp.float32) + self.delta_weight(name)).astype(w.dtype))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        w = self.kernel.get_value()
        self.kernel.set_value((w.astype(jnp.float32) - self.delta_weight(name)).astype(w.dtype))
        self._mark_merged(name, False)


class LoraLinearGeneral(_FlatLora):
    """LoRA on ``nnx.LinearGeneral``: ``A [prod(in_features), r]``, ``B [r, prod(out_features)]``.

    The branch contracts the same input axes (``axis``) as the layer. ``batch_axis`` is not supported.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from peftjax.config import LoraConfig
    >>> from peftjax.tuners.lora import inject_lora
    >>> model = nnx.Module()
    >>> model.proj = nnx.LinearGeneral(16, (4, 8), rngs=nnx.Rngs(0))
    >>> _ = inject_lora(model, LoraConfig(r=2, target_modules=["proj"]))
    >>> model.proj.lora_A["default"].shape, model.proj.lora_B["default"].shape
    ((16, 2), (2, 32))
    >>> model.proj(jnp.ones((3, 16))).shape
    (3, 4, 8)
    """

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        if self.batch_axis:
            raise NotImplementedError(
                f"{path} (LinearGeneral): batch_axis={dict(self.batch_axis)} is not supported by LoRA"
            )
        _FlatLora.check_lora(self, path, use_dora=use_dora, lora_bias=lora_bias, init=init)

    def _flat_features(self) -> tuple[int, int]:
        return math.prod(self.in_features), math.prod(self.out_features)

    def _to_kernel(self, flat: jax.Array) -> jax.Array:
        return flat.reshape(self.kernel.get_value().shape)

    def __call__(self, inputs, *args, **kwargs):
        y = self._peftjax_base.__call__(self, inputs, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return y
        ndim = jnp.ndim(inputs)
        axis = tuple(sorted(a % ndim for a in self.axis))  # flax pairs the sorted axes with the kernel's
        for name, spec in live:
            a, b = self.lora_A[name].get_value(), self.lora_B[name].get_value()
            h = apply_dropout(inputs, spec.dropout, f"{self.adapter_path}/{name}").astype(a.dtype)
            a = a.reshape(*self.in_features, spec.r)
            t = jax.lax.dot_general(h, a, ((axis, tuple(range(len(axis)))), ((), ())))
            lora = (t @ b).reshape(*t.shape[:-1], *self.out_features)
            y = y + (spec.scaling * lora).astype(y.dtype)
        return y


class _EinsumSplit(NamedTuple):
    """An einsum ``lhs,kernel->out`` factored through a rank axis: ``lhs,A->mid`` then ``mid,B->out``."""

    to_rank: str  # "bsd,dr->bsr"
    from_rank: str  # "bsr,rhk->bshk"
    contracted: tuple[int, ...]  # kernel axes shared with the input only, in kernel order
    produced: tuple[int, ...]  # kernel axes that appear in the output only, in kernel order


def _split_einsum(einsum_str: str, where: str) -> _EinsumSplit:
    eq = einsum_str.replace(" ", "")
    inputs, out = eq.split("->")
    lhs, kernel = inputs.split(",")

    def unsupported(why: str) -> NotImplementedError:
        return NotImplementedError(f"{where}: LoRA cannot factor einsum {einsum_str!r}: {why}")

    if "..." in kernel:
        raise unsupported("the kernel operand has an ellipsis")
    if len(set(kernel)) != len(kernel):
        raise unsupported("a kernel axis is repeated")
    lhs_letters, out_letters = set(lhs.replace("...", "")), set(out.replace("...", ""))
    contracted, produced = [], []
    for i, c in enumerate(kernel):
        if c in lhs_letters and c not in out_letters:
            contracted.append(i)
        elif c in out_letters and c not in lhs_letters:
            produced.append(i)
        elif c in lhs_letters:
            raise unsupported(f"kernel axis {c!r} is a batch axis shared by input and output")
        else:
            raise unsupported(f"kernel axis {c!r} is summed over without touching the input")
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
    return _EinsumSplit(f"{lhs},{a_axes}->{mid}", f"{mid},{b_axes}->{out}", tuple(contracted), tuple(produced))


class LoraEinsum(_FlatLora):
    """LoRA on ``nnx.Einsum``: ``A [prod(contracted kernel dims), r]``, ``B [r, prod(output kernel dims)]``.

    For ``"bshk,hkd->bsd"`` with kernel ``(4, 8, 16)``: ``A [32, r]``, ``B [r, 16]``, and the
    branch is ``einsum("bshk,hkr->bsr", x, A) @ B``. Kernel axes that are shared by the input and
    the output (``"bhd,hdk->bhk"``), or that touch neither, cannot be factored this way.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from peftjax.config import LoraConfig
    >>> from peftjax.tuners.lora import inject_lora
    >>> model = nnx.Module()
    >>> model.mix = nnx.Einsum("bshk,hkd->bsd", (4, 8, 16), (16,), rngs=nnx.Rngs(0))
    >>> _ = inject_lora(model, LoraConfig(r=2, target_modules=["mix"]))
    >>> model.mix.lora_A["default"].shape, model.mix.lora_B["default"].shape
    ((32, 2), (2, 16))
    >>> model.mix(jnp.ones((1, 3, 4, 8))).shape
    (1, 3, 16)
    """

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        _split_einsum(self.einsum_str, f"{path} (Einsum)")
        _FlatLora.check_lora(self, path, use_dora=use_dora, lora_bias=lora_bias, init=init)

    def _split(self, einsum_str: str | None = None) -> _EinsumSplit:
        split = _split_einsum(self.einsum_str, self.adapter_path)
        if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
            other = _split_einsum(einsum_str, self.adapter_path)
            if other[2:] != split[2:]:
                raise NotImplementedError(
                    f"{self.adapter_path}: einsum {einsum_str!r} uses the kernel axes differently from "
                    f"{self.einsum_str!r}, which the adapter was built for"
                )
            split = other
        return split

    def _kernel_dims(self) -> tuple[int, ...]:
        return tuple(self.kernel.get_value().shape)

    def _flat_features(self) -> tuple[int, int]:
        split, dims = self._split(), self._kernel_dims()
        return math.prod(dims[i] for i in split.contracted), math.prod(dims[i] for i in split.produced)

    def _to_kernel(self, flat: jax.Array) -> jax.Array:
        split, dims = self._split(), self._kernel_dims()
        order = split.contracted + split.produced
        return flat.reshape([dims[i] for i in order]).transpose(np.argsort(order))

    def __call__(self, inputs, einsum_str=None, *args, **kwargs):
        y = self._peftjax_base.__call__(self, inputs, einsum_str, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return y
        split, dims = self._split(einsum_str), self._kernel_dims()
        a_shape = [dims[i] for i in split.contracted]
        b_shape = [dims[i] for i in split.produced]
        for name, spec in live:
            a, b = self.lora_A[name].get_value(), self.lora_B[name].get_value()
            h = apply_dropout(inputs, spec.dropout, f"{self.adapter_path}/{name}").astype(a.dtype)
            t = jnp.einsum(split.to_rank, h, a.reshape(*a_shape, spec.r))
            lora = jnp.einsum(split.from_rank, t, b.reshape(spec.r, *b_shape))
            y = y + (spec.scaling * lora).astype(y.dtype)
        return y


class _ConvView:
    """The conv layer seen with some attributes replaced, so ``nnx.Conv.__call__`` runs a LoRA factor.

    This keeps the branch on exactly the layer's own padding rules (``SAME``, ``CIRCULAR``,
    ``CAUSAL``, ints), strides, dilations and batch-dimension handling.
    """

    def __init__(self, layer, **overrides):
        self._layer, self._overrides = layer, overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._layer, name)


def _as_is(arrays, dtype=None):
    return arrays


class LoraConv(KernelLora):
    """LoRA on ``nnx.Conv`` (channels-last, any number of spatial dims), as PEFT's ``ConvNd`` LoRA.

    ``A [*kernel_size, in, r]`` is convolved with the layer's strides, padding and dilations;
    ``B [r, out]`` is the 1×1 convolution after it; the merged kernel is
    ``W + s * einsum("...ir,ro->...io", A, B)``. PEFT files hold ``lora_A.weight [r, in, *k]``
    and ``lora_B.weight [out, r, 1, ...]`` (torch's OI + spatial layout), plus ``lora_B.bias [out]``
    with ``lora_bias`` and ``lora_magnitude_vector [1, out, 1, ...]`` with DoRA.

    Grouped and masked convolutions raise ``NotImplementedError``. One difference from PEFT:
    PEFT's ``lora_A`` drops the base layer's dilation, so its forward disagrees with its own
    merge on dilated convs; here ``A`` keeps the dilation, and forward equals merge.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from peftjax.config import LoraConfig
    >>> from peftjax.tuners.lora import inject_lora
    >>> model = nnx.Module()
    >>> model.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding="VALID", rngs=nnx.Rngs(0))
    >>> _ = inject_lora(model, LoraConfig(r=4, target_modules=["conv"]))
    >>> model.conv.peft_tensors("default")["lora_A.weight"].shape
    (4, 3, 3, 3)
    >>> model.conv(jnp.ones((2, 9, 9, 3))).shape
    (2, 4, 4, 8)
    """

    lora_kind = "conv"

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        if self.feature_group_count != 1:
            raise NotImplementedError(
                f"{path} (Conv): LoRA on grouped convolutions (feature_group_count="
                f"{self.feature_group_count}) is not supported"
            )
        if self.mask is not None:
            raise NotImplementedError(f"{path} (Conv): LoRA on masked convolutions is not supported")
        if lora_bias and self.bias is None:
            raise NotImplementedError(f"{path} (Conv): lora_bias needs a base layer with a bias, to merge into")
        _init_kind(path, init)

    def _init_factors(self, spec: LoraSpec, key, init) -> tuple[jax.Array, jax.Array]:
        self.check_lora(self.adapter_path, use_dora=spec.use_dora, lora_bias=spec.lora_bias, init=init)
        *k, c_in, c_out = self.kernel.get_value().shape
        # PEFT initializes the torch conv weights, whose fan-in is in * prod(kernel_size)
        a, b = init_factors(key, "linear", _init_kind(self.adapter_path, init), math.prod(k) * c_in, c_out, spec.r)
        return a.reshape(*k, c_in, spec.r), b

    def peft_layout(self, name: str | None = None):  # LoRA's layout is the same for every adapter
        nd = len(self.kernel_size)
        ones = (1,) * nd
        a_to = (nd + 1, nd, *range(nd))  # [*k, in, r] -> [r, in, *k]
        a_from = (*range(2, nd + 2), 1, 0)

        def b_to(b):
            return b.T.reshape(b.shape[1], b.shape[0], *ones)

        def b_from(b):
            return b.reshape(b.shape[0], b.shape[1]).T

        return {
            "lora_A.weight": (self.lora_A, lambda a: a.transpose(a_to), lambda a: a.transpose(a_from)),
            "lora_B.weight": (self.lora_B, b_to, b_from),
            "lora_B.bias": (self.lora_B_bias, _same, _same),
            "lora_magnitude_vector": (
                self.lora_magnitude_vector, lambda m: m.reshape(1, -1, *ones), lambda m: m.reshape(-1)
            ),
        }

    def delta_weight(self, name: str, spec: LoraSpec | None = None) -> jax.Array:
        """``s * A·B`` as a ``[*k, in, out]`` kernel (exact because ``B`` is 1×1)."""
        spec = spec or self.spec(name)
        a, b = self.lora_A[name].get_value(), self.lora_B[name].get_value()
        return spec.scaling * jnp.einsum("...ir,ro->...io", a, b)

    def _conv(self, x: jax.Array, kernel: jax.Array, mask=None) -> jax.Array:
        """``x`` convolved with ``kernel`` as this layer would: no bias, no dtype promotion."""
        view = _ConvView(
            self, kernel=kernel, kernel_shape=kernel.shape, out_features=kernel.shape[-1], bias=None,
            use_bias=False, mask=mask, feature_group_count=1, dtype=None, promote_dtype=_as_is,
            preferred_element_type=None, conv_general_dilated=jax.lax.conv_general_dilated,
        )
        return nnx.Conv.__call__(view, x)

    def _branch(self, h, a, b):
        return self._conv(h, a) @ b

    def _apply_kernel(self, h, w):
        return self._conv(h, w.astype(h.dtype))
