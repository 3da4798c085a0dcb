"""AdaLoRA's SVD-form layer for Flax NNX (PEFT's ``SVDLinear``).

A targeted ``nnx.Linear`` (GPT-2's ``Conv1D`` included) keeps its ``kernel`` and ``bias`` and gains,
per adapter name, the factors of ``ΔW = B (A ⊙ E)`` in PEFT's own layouts (HF PEFT 0.21,
``peft/tuners/adalora/layer.py``):

- ``lora_A: [r, in]`` (right singular vectors), ``lora_E: [r, 1]`` (singular values) and
  ``lora_B: [out, r]`` (left singular vectors), trained;
- ``ranknum: [1]``, the initial rank ``init_r`` as a float: a frozen ``nnx.Param`` (PEFT's
  ``requires_grad=False`` parameter, counted in "all params" as there) and never saved.

The forward adds ``dropout(x) @ (A ⊙ E)ᵀ @ Bᵀ · scaling / (ranknum + 1e-5)`` with
``scaling = lora_alpha`` (``r`` if ``lora_alpha <= 0``), PEFT's exact expression. ``merge`` adds
``ΔWᵀ`` (the kernel is ``[in, out]`` here) to the kernel and ``unmerge`` subtracts it.
A layer loaded from a budgeted adapter (``rank_pattern`` set) has ``r`` = the kept rank while
``ranknum`` stays ``init_r``, exactly as PEFT's ``resize_modules_by_rank_pattern`` leaves it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdapterDictLayer, AdditiveLayer, AdapterParam, mixin_subclass


class RankNum(nnx.Param):
    """AdaLoRA's ``ranknum``: a frozen parameter (not an adapter weight, not saved)."""


@dataclasses.dataclass(frozen=True)
class AdaLoraSpec:
    """Static settings of one AdaLoRA adapter on one layer.

    Attributes:
      r: the rank the layer holds (``init_r``, or the kept rank of a loaded ``rank_pattern``).
      scaling: ``lora_alpha`` (PEFT: ``lora_alpha if lora_alpha > 0 else r``).
      dropout: ``lora_dropout`` on the branch input, in training only.
    """

    r: int
    scaling: float
    dropout: float


@functools.partial(jax.jit, static_argnames=("r", "n_in", "n_out", "init"))
def _init_factors(key, *, r: int, n_in: int, n_out: int, init: bool):
    """``A [r, in]``, ``E [r, 1]``, ``B [out, r]``: PEFT's ``E = 0``, ``A, B ~ N(0, 0.02²)``; else all N(0, 1)."""
    ka, ke, kb = jax.random.split(key, 3)
    std = 0.02 if init else 1.0
    e = jnp.zeros((r, 1), jnp.float32) if init else jax.random.normal(ke, (r, 1), jnp.float32)
    return std * jax.random.normal(ka, (r, n_in), jnp.float32), e, std * jax.random.normal(kb, (n_out, r), jnp.float32)


def _same(x):
    return x


def adalora_delta(a, e, b, scaling: float, ranknum) -> jax.Array:
    """``B (A ⊙ E) · scaling / (ranknum + 1e-5)`` in torch's ``[out, in]`` layout (float32)."""
    a, e, b = (jnp.asarray(v, jnp.float32) for v in (a, e, b))
    return (b @ (a * e)) * scaling / (ranknum + 1e-5)


class AdaLoraLayer(AdditiveLayer):
    """Mixin of an AdaLoRA ``SVDLinear`` (``isinstance(m, AdaLoraLayer)`` finds them)."""

    method_name = "AdaLoRA"
    status_module_type = "adalora.SVDLinear"  # PEFT's repr, for nn.Linear and Conv1D alike
    bnb_status_prefix = "adalora.SVD"  # PEFT's own bitsandbytes layer: <prefix>Linear4bit
    weight_dicts = ("lora_A", "lora_E", "lora_B")
    # not a cache dict: a failed merge's rollback drops those entries, and ranknum must stay
    adapter_state_attrs = AdapterDictLayer.adapter_state_attrs + ("ranknum",)

    def add_adalora(self, name: str, spec: AdaLoraSpec, ranknum: int, key: jax.Array, init: bool = True) -> None:
        """Adds adapter ``name``: ``E = 0``, ``A, B ~ N(0, 0.02²)`` (``init``), else all standard normal."""
        self._check_new(name)
        if not hasattr(self, "ranknum"):
            self.ranknum = nnx.Dict()
        n_in, n_out = self.kernel.get_value().shape
        a, e, b = _init_factors(key, r=spec.r, n_in=n_in, n_out=n_out, init=bool(init))
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = AdapterParam(a), AdapterParam(e), AdapterParam(b)
        self.ranknum[name] = RankNum(jnp.full((1,), float(ranknum), jnp.float32))
        self._add_spec(name, spec)

    def delete_adapter(self, name: str) -> None:
        AdapterDictLayer.delete_adapter(self, name)
        if name in self.ranknum:
            del self.ranknum[name]

    def peft_layout(self, name: str):
        return {attr: (getattr(self, attr), _same, _same) for attr in self.weight_dicts}

    def _describe(self, name: str) -> str:
        return f"AdaLoRA adapter {name!r}, r={self.spec(name).r}"

    def _factors(self, name: str):
        a = self.lora_A[name].get_value()
        return a, self.lora_E[name].get_value(), self.lora_B[name].get_value(), self.ranknum[name].get_value()

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        for name, spec in self._live_adapters():
            a, e, b, ranknum = self._factors(name)
            h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(a.dtype)
            h = (h @ (a * e).T @ b.T) * spec.scaling / (ranknum[0] + 1e-5)
            y = (y.astype(h.dtype) + h).astype(y.dtype)
        return y

    def delta_weight(self, name: str) -> jax.Array:
        """``B (A ⊙ E) · scaling / (ranknum + 1e-5)`` in the kernel's ``[in, out]`` layout (float32)."""
        a, e, b, ranknum = self._factors(name)
        return adalora_delta(a, e, b, self.spec(name).scaling, ranknum[0].astype(jnp.float32)).T

    def kernel_delta(self, name: str) -> jax.Array:
        return self.delta_weight(name)


def adalora_class_for(module: nnx.Module) -> type:
    if isinstance(module, AdaLoraLayer):
        return type(module)
    return mixin_subclass(type(module), AdaLoraLayer, "AdaLora")
