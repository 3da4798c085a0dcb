"""WaveFT for Flax NNX: a weight update trained as a few coefficients of its 2-D wavelet transform.

A targeted ``nnx.Linear`` (GPT-2's ``Conv1D`` included) keeps its ``kernel`` and ``bias`` and gains,
per adapter name, ``waveft_spectrum: [n]`` (trained) and ``waveft_indices: [2, n]`` (the fixed
positions ``(row, column)`` in the torch ``[out, in]`` weight, never trained nor saved), as in HF
PEFT 0.22.0 (``peft/tuners/waveft/layer.py``):

    C[P, Q] = 0 except C[rows + (P - out) // 2, cols + (Q - in) // 2] = spectrum
    delta_W = scaling * center_crop(idwt2(C's four quadrants), [out, in])
    y = base(x) + x @ delta_W.T

``P`` and ``Q`` are ``out`` and ``in`` grown by the filter length minus 2, then to even; the
quadrants of ``C`` are the approximation and the horizontal, vertical and diagonal details. With
``use_idwt=False``, ``delta_W = scaling * C`` on the ``[out, in]`` grid itself.

On disk (PEFT's key): ``base_model.model.<path>.waveft_spectrum`` ``[n]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.tuners.base import AdapterParam, AdditiveLayer, mixin_subclass
from peftjax.tuners.waveft._wavelets import RECONSTRUCTION_LOW, idwt2


class WaveletIndices(nnx.Variable):
    """A layer's fixed coefficient positions ``[2, n]`` (rows, columns): drawn from the seed, never saved."""


@dataclasses.dataclass(frozen=True)
class WaveFTSpec:
    """Static settings of one WaveFT adapter on one layer."""

    n_frequency: int
    scaling: float
    wavelet_family: str
    use_idwt: bool


def waveft_delta(spectrum, indices, n_in: int, n_out: int, spec: WaveFTSpec) -> jax.Array:
    """``delta_W`` in torch's ``[out, in]`` layout, in the spectrum's dtype (PEFT's ``get_delta_weight``)."""
    rows, cols = indices
    if not spec.use_idwt:
        dense = jnp.zeros((n_out, n_in), spectrum.dtype).at[rows, cols].set(spectrum)
        return dense * spec.scaling
    grow = len(RECONSTRUCTION_LOW[spec.wavelet_family]) - 2
    p, q = n_out + grow, n_in + grow
    p, q = p + p % 2, q + q % 2
    dense = jnp.zeros((p, q), spectrum.dtype).at[rows + (p - n_out) // 2, cols + (q - n_in) // 2].set(spectrum)
    h, w = p // 2, q // 2
    full = idwt2(dense[:h, :w], dense[:h, w:], dense[h:, :w], dense[h:, w:], spec.wavelet_family) * spec.scaling
    top, left = (full.shape[0] - n_out) // 2, (full.shape[1] - n_in) // 2
    return full[top:top + n_out, left:left + n_in]


def _same(x):
    return x


class WaveFTLayer(AdditiveLayer):
    """Mixin marking a WaveFT layer (``isinstance(m, WaveFTLayer)`` finds them)."""

    method_name = "WaveFT"
    status_module_type = "waveft.WaveFTLinear"  # PEFT's layer class, whatever the base layer
    weight_dicts = ("waveft_spectrum",)
    cache_dicts = ()
    adapter_state_attrs = AdditiveLayer.adapter_state_attrs + ("waveft_indices",)


class WaveFTLinear(WaveFTLayer):
    """WaveFT on ``nnx.Linear`` and its subclasses (GPT-2's ``Conv1D`` included)."""

    def add_waveft(self, name: str, spec: WaveFTSpec, indices, key: jax.Array, *, init_weights: bool) -> None:
        self._check_new(name)
        if not hasattr(self, "waveft_indices"):
            self.waveft_indices = nnx.Dict()
        self.waveft_indices[name] = WaveletIndices(jnp.asarray(indices, jnp.int32))
        n = spec.n_frequency
        spectrum = jnp.zeros((n,), jnp.float32) if init_weights else 0.01 * jax.random.normal(key, (n,), jnp.float32)
        self.waveft_spectrum[name] = AdapterParam(spectrum)
        self._add_spec(name, spec)

    def delete_adapter(self, name: str) -> None:
        AdditiveLayer.delete_adapter(self, name)
        if name in self.waveft_indices:
            del self.waveft_indices[name]

    def peft_layout(self, name: str):
        return {"waveft_spectrum": (self.waveft_spectrum, _same, _same)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"WaveFT n_frequency={spec.n_frequency} wavelet={spec.wavelet_family}"

    def delta_weight(self, name: str) -> jax.Array:
        """``delta_W`` in torch's ``[out, in]`` layout, in the spectrum's dtype."""
        n_in, n_out = self.kernel.get_value().shape
        return waveft_delta(self.waveft_spectrum[name].get_value(), self.waveft_indices[name].get_value(),
                            n_in, n_out, self.spec(name))

    def kernel_delta(self, name: str) -> jax.Array:
        return self.delta_weight(name).astype(jnp.float32).T

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        for name, _ in self._live_adapters():
            delta = self.delta_weight(name)
            y = (y.astype(delta.dtype) + x.astype(delta.dtype) @ delta.T).astype(y.dtype)
        return y


def waveft_class_for(module: nnx.Module) -> type:
    if isinstance(module, WaveFTLayer):
        return type(module)
    return mixin_subclass(type(module), WaveFTLinear, "WaveFT")
