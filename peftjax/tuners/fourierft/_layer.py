"""FourierFT for Flax NNX: a weight update trained as a few entries of its 2-D Fourier spectrum.

A targeted ``nnx.Linear`` (GPT-2's ``Conv1D`` included) keeps its ``kernel`` and ``bias`` and gains,
per adapter name, ``fourierft_spectrum: [n]`` (trained) and ``fourierft_indices: [2, n]`` (the fixed
positions ``(row, column)`` in the torch ``[out, in]`` weight; a :class:`FourierIndices`
variable, never trained nor saved), as in HF PEFT 0.21 (``peft/tuners/fourierft/layer.py``):

    delta_W = real(ifft2(S)) * scaling,   S[out, in] = 0 except S[indices] = spectrum
    y = base(x) + x @ delta_W.T

``merge`` adds ``delta_W.T`` to the kernel (``[in, out]`` here); ``unmerge`` subtracts it.

On disk (PEFT's key): ``base_model.model.<path>.fourierft_spectrum`` ``[n]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass


class FourierIndices(nnx.Variable):
    """A layer's fixed spectral positions ``[2, n]`` (rows, columns): drawn from the seed, never saved."""


@dataclasses.dataclass(frozen=True)
class FourierSpec:
    """Static settings of one FourierFT adapter on one layer.

    Attributes:
      n_frequency: the number of trained spectral entries.
      scaling: the factor on ``delta_W``.
    """

    n_frequency: int
    scaling: float


def _same(x):
    return x


def fourier_delta(spectrum, indices, n_in: int, n_out: int, scaling: float) -> jax.Array:
    """``real(ifft2(S)) * scaling`` in torch's ``[out, in]`` layout, float32 (PEFT's ``get_delta_weight``).

    ``S`` is ``[out, in]``, zero but at ``indices`` ``[2, n]`` (rows, columns), which hold ``spectrum``.
    """
    rows, cols = indices
    dense = jnp.zeros((n_out, n_in), jnp.float32).at[rows, cols].set(spectrum.astype(jnp.float32))
    return jnp.fft.ifft2(dense).real.astype(jnp.float32) * scaling


class FourierFTLayer(AdapterDictLayer):
    """Mixin marking a FourierFT layer (``isinstance(m, FourierFTLayer)`` finds them)."""

    method_name = "FourierFT"
    status_module_type = "fourierft.FourierFTLinear"  # PEFT's layer class, whatever the base layer
    weight_dicts = ("fourierft_spectrum",)
    cache_dicts = ()
    adapter_state_attrs = AdapterDictLayer.adapter_state_attrs + ("fourierft_indices",)


class FourierFTLinear(FourierFTLayer):
    """FourierFT on ``nnx.Linear`` and its subclasses (GPT-2's ``Conv1D`` included)."""

    def add_fourierft(self, name: str, spec: FourierSpec, indices, key: jax.Array, *, init_weights: bool) -> None:
        self._check_new(name)
        if not hasattr(self, "fourierft_indices"):
            self.fourierft_indices = nnx.Dict()
        self.fourierft_indices[name] = FourierIndices(jnp.asarray(indices, jnp.int32))
        n = spec.n_frequency
        spectrum = jnp.zeros((n,), jnp.float32) if init_weights else jax.random.normal(key, (n,), jnp.float32)
        self.fourierft_spectrum[name] = AdapterParam(spectrum)
        self._add_spec(name, spec)

    def delete_adapter(self, name: str) -> None:
        AdapterDictLayer.delete_adapter(self, name)
        if name in self.fourierft_indices:
            del self.fourierft_indices[name]

    def peft_layout(self, name: str):
        return {"fourierft_spectrum": (self.fourierft_spectrum, _same, _same)}

    def _describe(self, name: str) -> str:
        return f"FourierFT n_frequency={self.spec(name).n_frequency}"

    def delta_weight(self, name: str) -> jax.Array:
        """``real(ifft2(S)) * scaling`` in torch's ``[out, in]`` layout, float32 (PEFT's ``get_delta_weight``)."""
        n_in, n_out = self.kernel.get_value().shape
        return fourier_delta(self.fourierft_spectrum[name].get_value(), self.fourierft_indices[name].get_value(),
                             n_in, n_out, self.spec(name).scaling)

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        for name, _ in self._live_adapters():
            delta = self.delta_weight(name).astype(self.fourierft_spectrum[name].get_value().dtype)
            y = (y.astype(delta.dtype) + x.astype(delta.dtype) @ delta.T).astype(y.dtype)
        return y

    def merge_adapter(self, name: str) -> None:
        self._shift_kernel(self.delta_weight(name).T, 1.0)
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._shift_kernel(self.delta_weight(name).T, -1.0)
        self._mark_merged(name, False)


def fourierft_class_for(module: nnx.Module) -> type:
    if isinstance(module, FourierFTLayer):
        return type(module)
    return mixin_subclass(type(module), FourierFTLinear, "FourierFT")
