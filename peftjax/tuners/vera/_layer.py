"""VeRA for Flax NNX: shared frozen random projections, trained per-layer scaling vectors.

A targeted ``nnx.Linear`` (GPT-2's ``Conv1D`` included) keeps its ``kernel`` and ``bias`` and gains,
per adapter name, ``vera_lambda_d: [r]`` and ``vera_lambda_b: [out]``, as in HF PEFT 0.21
(``peft/tuners/vera/layer.py``). The projections ``vera_A: [r, in_max]`` and ``vera_B: [out_max, r]``
are one pair for the whole model: every layer holds a reference to the same two
:class:`VeraProjection` variables (NNX keeps a shared variable once), and slices them to its size:

    y = base(x) + lambda_b * ((lambda_d * (dropout(x) @ A[:, :in].T)) @ B[:out, :].T)

``merge`` adds ``delta_W = (lambda_b * B[:out]) @ (lambda_d * A[:, :in])`` (torch ``[out, in]``)
to the kernel (``[in, out]`` here, so transposed); ``unmerge`` subtracts it.

On disk (PEFT's keys): ``base_model.model.<path>.vera_lambda_b`` ``[out]``,
``base_model.model.<path>.vera_lambda_d`` ``[r]``, and (``save_projection=True``) the shared
``base_model.vera_A`` / ``base_model.vera_B``.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.nn._dropout import active_dropout_key, apply_dropout, fold_key
from peftjax.tuners.base import AdapterDictLayer, AdditiveLayer, AdapterParam, mixin_subclass


class VeraProjection(nnx.Variable):
    """A shared, frozen VeRA projection: PEFT's buffer, neither a parameter nor trained."""


@dataclasses.dataclass(frozen=True)
class VeraSpec:
    """Static settings of one VeRA adapter on one layer.

    Attributes:
      r: the rank (rows of ``vera_A``).
      dropout: ``vera_dropout``, applied to the input of the VeRA branch in training.
      projection_prng_key: the projections' seed (must agree between adapters, as in PEFT).
      save_projection: whether the file carries the projections.
      sample_at_inference: PVeRA's option (see :class:`PveraLinear`).
    """

    r: int
    dropout: float
    projection_prng_key: int
    save_projection: bool
    sample_at_inference: bool = False  # PVeRA: sample when no dropout key is active too


def _same(x):
    return x


def vera_delta(lambda_b, lambda_d, vera_a, vera_b) -> jax.Array:
    """``(lambda_b * B) @ (lambda_d * A)`` in torch's ``[out, in]`` layout (float32).

    ``vera_a`` ``[r, in]`` and ``vera_b`` ``[out, r]`` are the layer's slices of the shared projections.
    """
    f32 = jnp.float32
    return (lambda_b.astype(f32)[:, None] * vera_b.astype(f32)) @ (lambda_d.astype(f32)[:, None] * vera_a.astype(f32))


class VeraLayer(AdditiveLayer):
    """Mixin marking a VeRA layer (``isinstance(m, VeraLayer)`` finds them)."""

    method_name = "VeRA"
    weight_dicts = ("vera_lambda_b", "vera_lambda_d")
    adapter_state_attrs = AdapterDictLayer.adapter_state_attrs + ("vera_A", "vera_B")
    reports_quantization_backend = True  # PEFT's status names bitsandbytes' backend for it


class VeraLinear(VeraLayer):
    """VeRA on ``nnx.Linear`` and its subclasses (GPT-2's ``Conv1D`` included)."""

    key_prefix = "vera_"  # PEFT's key names: vera_lambda_b, vera_lambda_d
    probabilistic = False  # PVeRA: A has 2r rows, the first r give a mean, the others a log-variance

    def add_vera(self, name: str, spec: VeraSpec, projections: tuple[VeraProjection, VeraProjection],
                 key: jax.Array, *, init_weights: bool, d_initial: float) -> None:
        self._check_new(name)
        if not hasattr(self, "vera_A"):
            self.vera_A, self.vera_B = nnx.Dict(), nnx.Dict()
        n_in, n_out = self.kernel.get_value().shape
        vera_a, vera_b = projections
        rows = 2 * spec.r if self.probabilistic else spec.r
        if vera_a.get_value().shape[1] < n_in or vera_b.get_value().shape[0] < n_out:
            raise ValueError(
                f"{self.adapter_path}: the shared projections vera_A {list(vera_a.get_value().shape)} / vera_B "
                f"{list(vera_b.get_value().shape)} are smaller than the layer ([in={n_in}], [out={n_out}])"
            )
        self.vera_A[name], self.vera_B[name] = vera_a, vera_b
        if init_weights:  # PEFT's reset_vera_parameters: d = d_initial, b = 0 (a no-op adapter)
            lambda_d = jnp.full((rows,), d_initial, jnp.float32)
            lambda_b = jnp.zeros((n_out,), jnp.float32)
        else:  # PEFT's construction values: d ~ N(0, 1), b = 1
            lambda_d = jax.random.normal(key, (rows,), jnp.float32)
            lambda_b = jnp.ones((n_out,), jnp.float32)
        self.vera_lambda_d[name] = AdapterParam(lambda_d)
        self.vera_lambda_b[name] = AdapterParam(lambda_b)
        self._add_spec(name, spec)

    def delete_adapter(self, name: str) -> None:
        AdapterDictLayer.delete_adapter(self, name)
        for store in (self.vera_A, self.vera_B):
            if name in store:
                del store[name]

    def peft_layout(self, name: str):
        return {
            f"{self.key_prefix}lambda_b": (self.vera_lambda_b, _same, _same),
            f"{self.key_prefix}lambda_d": (self.vera_lambda_d, _same, _same),
        }

    def _describe(self, name: str) -> str:
        return f"{self.method_name} r={self.spec(name).r}"

    def _sliced(self, name: str) -> tuple[jax.Array, jax.Array]:
        """This layer's ``A[:, :in]`` (``[r, in]``) and ``B[:out, :]`` (``[out, r]``)."""
        n_in, n_out = self.kernel.get_value().shape
        return self.vera_A[name].get_value()[:, :n_in], self.vera_B[name].get_value()[:n_out, :]

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        for name, spec in self._live_adapters():
            a, b = self._sliced(name)
            lambda_d = self.vera_lambda_d[name].get_value()
            lambda_b = self.vera_lambda_b[name].get_value()
            h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(lambda_d.dtype)
            h = along_last(lambda_d, h.ndim) * (h @ a.T.astype(lambda_d.dtype))
            if self.probabilistic:
                h = self._sample(h, name, spec)
            h = along_last(lambda_b, h.ndim) * (h @ b.T.astype(lambda_d.dtype))
            y = (y.astype(h.dtype) + h).astype(y.dtype)
        return y

    def _sample(self, h: jax.Array, name: str, spec: VeraSpec) -> jax.Array:
        """PVeRA's reparametrisation: ``h = [mu, logvar]``; ``mu + eps exp(logvar / 2)`` with ``eps``
        drawn from the dropout key (training), else ``mu``."""
        mu, logvar = h[..., : spec.r], h[..., spec.r:]
        key = active_dropout_key()
        if key is None:
            if spec.sample_at_inference:
                raise ValueError(f"{self.adapter_path}: PVeRA adapter {name!r} has sample_at_inference=True, which "
                                 "draws noise at every call: run the model inside `with peftjax.dropout_key(key):`")
            return mu
        eps = jax.random.normal(fold_key(key, zlib.crc32(f"{self.adapter_path}/{name}/pvera".encode())), mu.shape)
        return mu + eps.astype(mu.dtype) * jnp.exp(0.5 * logvar)

    def kernel_delta(self, name: str) -> jax.Array:
        """``(lambda_b * B) @ (lambda_d * A)`` in the kernel's ``[in, out]`` layout (float32); for
        PVeRA the mean's rows only (PEFT merges the mean)."""
        a, b = self._sliced(name)
        lambda_d = self.vera_lambda_d[name].get_value()
        if self.probabilistic:
            r = self.spec(name).r
            a, lambda_d = a[:r], lambda_d[:r]
        return vera_delta(self.vera_lambda_b[name].get_value(), lambda_d, a, b).T


class PveraLinear(VeraLinear):
    """PVeRA (probabilistic VeRA) on ``nnx.Linear``: ``A`` has ``2r`` rows, ``lambda_d`` ``2r``
    entries; the first ``r`` of ``lambda_d * (x A^T)`` are a mean, the rest a log-variance, and the
    sample (the mean outside training) goes through ``lambda_b * B`` as VeRA's does. Noise comes
    from the dropout key (``peftjax.dropout_key``, which the train step and the Trainer set), so
    PEFT's torch draws are not reproduced; ``sample_at_inference=True`` asks for that key at
    inference too. Merging folds the mean (PEFT's rule)."""

    method_name = "PVeRA"
    status_module_type = "pvera.Linear"
    bnb_status_prefix = "pvera."  # PEFT's own bitsandbytes layer: <prefix>Linear4bit
    reports_quantization_backend = False  # its own bitsandbytes layers, not PEFT's generic backend (as VeRA)
    key_prefix = "pvera_"
    probabilistic = True



def vera_class_for(module: nnx.Module) -> type:
    if isinstance(module, VeraLayer):
        return type(module)
    return mixin_subclass(type(module), VeraLinear, "Vera")


def pvera_class_for(module: nnx.Module) -> type:
    if isinstance(module, PveraLinear):
        return type(module)
    return mixin_subclass(type(module), PveraLinear, "Pvera")
