"""NNX linear layers whose weight is stored in bitsandbytes' formats and dequantized in the forward.

``Linear4bit`` and ``Linear8bitLt`` (bitsandbytes' names) subclass ``nnx.Linear`` so every
tuner, targeting rule and ``"all-linear"`` treats them as linears. They hold no float kernel:
``layer.kernel`` is a read-only view whose ``get_value()`` dequantizes (inside a jitted step
that is one layer's weight, transient, never the model's), and whose ``set_value`` requantizes
(what a merge on a quantized base does in PEFT). The quantized arrays are
:class:`QuantizedWeight` variables, not ``nnx.Param``: no optimizer, filter or dtype cast
touches them.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.quantization import _bnb


class QuantizedWeight(nnx.Variable):
    """A quantized weight's storage (packed codes, scales); never trained."""


class QuantizedKernel:
    """``layer.kernel`` of a quantized layer: the dequantized ``[in, out]`` float32 kernel on demand."""

    __slots__ = ("layer",)

    def __init__(self, layer: "QuantizedLinear"):
        self.layer = layer

    def get_value(self) -> jax.Array:
        if self.layer.float_kernel is not None:  # merged into a dequantized weight (keep_float)
            return self.layer.float_kernel.get_value()
        return self.layer.dequantize()

    def __getitem__(self, index):
        return self.get_value()[index]

    @property
    def value(self) -> jax.Array:
        return self.get_value()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.layer.in_features, self.layer.out_features)

    def set_value(self, value) -> None:
        if self.layer.keep_float:  # merge_and_unload(dequantize=True): the merged weight stays in float
            self.layer.float_kernel = nnx.Param(jnp.asarray(value))
            return
        # PEFT's warning for a merge into a bitsandbytes weight: the merged weight is rounded again
        warnings.warn(f"{self.layer.path or type(self.layer).__name__}: Merge lora module to "
                      f"{'4-bit' if isinstance(self.layer, Linear4bit) else '8-bit'} linear may get different "
                      "generations due to rounding errors.", UserWarning, stacklevel=3)
        self.layer.requantize(value)


class QuantizedLinear(nnx.Linear):
    """What the two quantized layers share; not built directly."""

    def __init__(self, *, in_features: int, out_features: int, bias, compute_dtype, path: str = ""):
        # nnx.Linear.__init__ is not called: it would allocate the float kernel this layer exists to avoid
        self.in_features, self.out_features = in_features, out_features
        self.use_bias = bias is not None
        self.bias = nnx.Param(jnp.asarray(bias)) if bias is not None else nnx.data(None)
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.dtype = self.compute_dtype
        self.param_dtype = self.bias.get_value().dtype if bias is not None else self.compute_dtype
        self.path = path
        # keep_float: a kernel set (a merge) is kept in float as ``float_kernel`` instead of requantized
        self.keep_float = False
        self.float_kernel = nnx.data(None)
        self.precision = None
        self.preferred_element_type = None

    @property
    def kernel(self) -> QuantizedKernel:
        return QuantizedKernel(self)

    def dequantize(self) -> jax.Array:
        """The ``[in, out]`` float32 kernel, exactly as bitsandbytes dequantizes it (transposed)."""
        raise NotImplementedError

    def requantize(self, kernel) -> None:
        raise NotImplementedError

    def weight_entries(self) -> int:
        """Entries of the float weight the codes stand for (every layer's, where stacked)."""
        raise NotImplementedError

    def quantized_bytes(self) -> int:
        """Bytes of the quantized storage (what stays resident for this weight)."""
        return sum(int(v.get_value().nbytes) for v in vars(self).values() if isinstance(v, QuantizedWeight))

    def __call__(self, inputs, out_sharding=None):
        del out_sharding
        w = self.kernel.get_value().astype(self.compute_dtype)
        y = jnp.asarray(inputs).astype(self.compute_dtype) @ w
        if self.bias is not None:
            b = self.bias.get_value().astype(self.compute_dtype)
            y = y + b.reshape((1,) * (y.ndim - 1) + (-1,))
        return y.astype(jnp.asarray(inputs).dtype)  # bitsandbytes returns the input's dtype


class Linear4bit(QuantizedLinear):
    """A linear with an NF4/FP4 weight in bitsandbytes' layout (``peftjax.quantization._bnb.Quant4``)."""

    def __init__(self, quant: _bnb.Quant4, bias=None, *, compute_dtype=jnp.float32, weight_dtype=jnp.float32,
                 path: str = ""):
        """``weight_dtype``: the dtype of the weight that was quantized (bitsandbytes' ``quant_state.dtype``);
        dequantization rounds to it, as bitsandbytes' does, before the cast to ``compute_dtype``."""
        out_features, in_features = quant.shape
        super().__init__(in_features=in_features, out_features=out_features, bias=bias,
                         compute_dtype=compute_dtype, path=path)
        self.weight_dtype = jnp.dtype(weight_dtype).name
        if self.weight_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{path or 'Linear4bit'}: weight_dtype {self.weight_dtype!r} is not a float dtype "
                             "bitsandbytes dequantizes to (float32, bfloat16, float16)")
        self._set_quant(quant)

    def _set_quant(self, q: _bnb.Quant4) -> None:
        self.quant_type, self.blocksize, self.weight_shape = q.quant_type, q.blocksize, tuple(q.shape)
        self.weight = QuantizedWeight(jnp.asarray(q.packed))
        self.absmax = QuantizedWeight(jnp.asarray(q.absmax))
        self.nested = q.nested
        if q.nested:
            self.nested_absmax = QuantizedWeight(jnp.asarray(q.nested_absmax))
            self.nested_quant_map = QuantizedWeight(jnp.asarray(q.nested_code))
            self.offset = QuantizedWeight(jnp.asarray(q.offset, jnp.float32))
        else:
            self.nested_absmax = self.nested_quant_map = self.offset = nnx.data(None)

    def weight_entries(self) -> int:
        return 2 * int(self.weight.get_value().size)  # two 4-bit codes to a byte

    def quant_state(self, xp=jnp) -> _bnb.Quant4:
        get = (lambda v: v.get_value()) if xp is jnp else (lambda v: np.asarray(v.get_value()))
        nested = self.nested
        return _bnb.Quant4(
            get(self.weight), get(self.absmax), self.weight_shape, self.quant_type, self.blocksize,
            get(self.nested_absmax) if nested else None, get(self.nested_quant_map) if nested else None,
            get(self.offset) if nested else None,
        )

    def dequantize(self) -> jax.Array:
        w = _bnb.dequantize_4bit(self.quant_state(), xp=jnp).T
        if self.weight_dtype != "float32":  # bitsandbytes dequantizes into quant_state.dtype
            w = w.astype(self.weight_dtype).astype(jnp.float32)
        return w

    def requantize(self, kernel) -> None:
        w = np.asarray(jnp.asarray(kernel, jnp.float32)).T
        self._set_quant(_bnb.quantize_4bit(w, quant_type=self.quant_type, blocksize=self.blocksize,
                                           compress_statistics=self.nested))


class Linear8bitLt(QuantizedLinear):
    """A linear with an LLM.int8() weight: ``int8 [out, in]`` and per-row absmax ``SCB``."""

    def __init__(self, cb, scb, bias=None, *, compute_dtype=jnp.float32, path: str = ""):
        out_features, in_features = np.shape(cb)
        super().__init__(in_features=in_features, out_features=out_features, bias=bias,
                         compute_dtype=compute_dtype, path=path)
        self.weight = QuantizedWeight(jnp.asarray(cb, jnp.int8))
        self.SCB = QuantizedWeight(jnp.asarray(scb, jnp.float32))

    def weight_entries(self) -> int:
        return int(self.weight.get_value().size)

    def dequantize(self) -> jax.Array:
        return _bnb.int8_dequantize(self.weight.get_value(), self.SCB.get_value(), xp=jnp).T

    def requantize(self, kernel) -> None:
        cb, scb = _bnb.int8_vectorwise_quant(np.asarray(jnp.asarray(kernel, jnp.float32)).T)
        self.weight = QuantizedWeight(jnp.asarray(cb))
        self.SCB = QuantizedWeight(jnp.asarray(scb))
