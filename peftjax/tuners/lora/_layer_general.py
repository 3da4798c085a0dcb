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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.tuners.base import original_class
from peftjax.tuners.lora._layer import LoraLayer
from peftjax.tuners.lora._math import EinsumFactor, factor_einsum


class _FlatLora(LoraLayer):
    """Shared by the layers whose kernel is a reshaped/transposed ``[n_in, n_out]`` matrix.

    Subclasses provide ``_to_2d`` and ``_from_2d``; no DoRA, no ``lora_bias``.
    """

    lora_kind = "general"

    def check_lora(self, path: str, *, use_dora: bool, lora_bias: bool, init) -> None:
        """Raises ``NotImplementedError`` naming ``path`` for what this layer cannot adapt."""
        kind = original_class(self).__name__
        if use_dora or lora_bias:
            raise NotImplementedError(f"{path} ({kind}): DoRA and lora_bias are not supported on this layer type")
        LoraLayer.check_lora(self, path, use_dora=use_dora, lora_bias=lora_bias, init=init)


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

    def _to_2d(self, w):
        return w.reshape(math.prod(self.in_features), math.prod(self.out_features))

    def _from_2d(self, w2):
        return w2.reshape(self.kernel.get_value().shape)

    def _branch(self, h, a, b):
        axis = tuple(sorted(ax % h.ndim for ax in self.axis))  # flax pairs the sorted axes with the kernel's
        t = jax.lax.dot_general(h, a.reshape(*self.in_features, a.shape[-1]), ((axis, tuple(range(len(axis)))), ((), ())))
        return (t @ b).reshape(*t.shape[:-1], *self.out_features)


def _split_einsum(einsum_str: str, where: str) -> EinsumFactor:
    try:
        return factor_einsum(einsum_str)
    except ValueError as e:
        raise NotImplementedError(f"{where}: LoRA cannot factor einsum {einsum_str!r}: {e}") from None


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

    def _split(self, einsum_str: str | None = None) -> EinsumFactor:
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

    def _to_2d(self, w):
        split, dims = self._split(), self._kernel_dims()
        n_in = math.prod(dims[i] for i in split.contracted)
        return w.transpose(split.contracted + split.produced).reshape(n_in, -1)

    def _from_2d(self, w2):
        split, dims = self._split(), self._kernel_dims()
        order = split.contracted + split.produced
        return w2.reshape([dims[i] for i in order]).transpose(np.argsort(order))

    def _branch(self, h, a, b, einsum_str=None):
        split, dims = self._split(einsum_str), self._kernel_dims()
        r = a.shape[-1]
        t = jnp.einsum(split.to_rank, h, a.reshape(*[dims[i] for i in split.contracted], r))
        return jnp.einsum(split.from_rank, t, b.reshape(r, *[dims[i] for i in split.produced]))


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


class LoraConv(LoraLayer):
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

    @property
    def status_module_type(self) -> str:  # PEFT's layer class for torch's Conv1d/2d/3d
        return f"lora.Conv{self._n_spatial()}d"

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
        LoraLayer.check_lora(self, path, use_dora=use_dora, lora_bias=lora_bias, init=init)

    def _to_2d(self, w):
        return w.reshape(-1, w.shape[-1])  # [*k, in, out] -> [prod(k) * in, out], PEFT's fan-in

    def _from_2d(self, w2):
        return w2.reshape(self.kernel.get_value().shape)

    def _a_shape(self, n_in: int, r: int) -> tuple[int, ...]:
        return (*self.kernel.get_value().shape[:-1], r)

    def _n_spatial(self) -> int:
        return len(self.kernel_size)

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
