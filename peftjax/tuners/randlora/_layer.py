"""RandLoRA for Flax NNX: a full-rank update from shared frozen random bases, scaled per layer.

As in HF PEFT 0.22.0 (``peft/tuners/randlora/layer.py``), a targeted linear layer with
``n = ceil(min(in, out) / r)`` bases takes the model's frozen bases sliced to its size,
``A = randlora_A[:, :n, :min] [r, 1, min]`` and ``B = randlora_B[:max, :n, :] [max, n, r]``, and
its trained ``lambda [r, n]`` and ``gamma [n, min]``:

    A_s = (lambda[:, :, None] * A * gamma[None]).reshape(r n, min)
    B_f = B.reshape(max, n r)
    y = base(x) + s * dropout(x) (B_f A_s)^T     (torch layout, when in <= out)

with ``s = randlora_alpha / r``; when ``in > out`` the roles of the sides swap (``B_f A_s`` is
``[in, out]``). The forward never forms ``B_f A_s``: ``x`` goes through ``A_s`` and ``B_f`` in turn.

On disk (PEFT 0.22's keys): ``<path>.randlora_lambda``, ``.randlora_gamma`` and, with
``save_projection``, the shared bases once (``base_model.randlora_A``, ``base_model.randlora_B``);
PEFT 0.21.2's files also hold a copy under every layer (``<path>.randlora_A``, ``.randlora_B``),
and those load.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdditiveLayer, AdapterParam, mixin_subclass
from peftjax.tuners.randlora._bases import num_bases


class RandLoraBasis(nnx.Variable):
    """A shared, frozen RandLoRA basis: PEFT's buffer, neither a parameter nor trained."""


@dataclasses.dataclass(frozen=True)
class RandLoraSpec:
    """Static settings of one RandLoRA adapter on one layer."""

    r: int
    scaling: float
    dropout: float
    projection_prng_key: int
    save_projection: bool
    sparse: bool
    very_sparse: bool


class RandLoraLayer(AdditiveLayer):
    """Mixin marking a RandLoRA layer (``isinstance(m, RandLoraLayer)`` finds them)."""

    method_name = "RandLoRA"
    status_module_type = "randlora.Linear"
    bnb_status_prefix = "randlora."  # PEFT's own bitsandbytes layer: <prefix>Linear4bit
    weight_dicts = ("randlora_lambda", "randlora_gamma")
    cache_dicts = ("randlora_A", "randlora_B")  # the model's shared bases, frozen

    def add_randlora(self, name: str, spec: RandLoraSpec, bases: tuple[RandLoraBasis, RandLoraBasis],
                     key: jax.Array, *, init_weights: bool) -> None:
        self._check_new(name)
        n_in, n_out = self.kernel.get_value().shape
        small, large = min(n_in, n_out), max(n_in, n_out)
        basis_a, basis_b = bases
        if basis_b.get_value().shape[0] < large or basis_a.get_value().shape[-1] < small:
            raise ValueError(f"{self.adapter_path}: the shared bases randlora_A {list(basis_a.get_value().shape)} / "
                             f"randlora_B {list(basis_b.get_value().shape)} are smaller than the layer "
                             f"([in={n_in}], [out={n_out}])")
        n = num_bases(small, spec.r)
        self.randlora_A[name], self.randlora_B[name] = basis_a, basis_b
        if init_weights:  # PEFT's reset_randlora_parameters
            lam = jnp.zeros((spec.r, n), jnp.float32)
            gamma = jnp.full((n, small), 1.0 / max(n, small), jnp.float32)
        else:  # PEFT's construction values
            lam = jax.random.normal(key, (spec.r, n), jnp.float32)
            gamma = jnp.full((n, small), 1.0 / large, jnp.float32)
        self.randlora_lambda[name] = AdapterParam(lam)
        self.randlora_gamma[name] = AdapterParam(gamma)
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        layout = {"randlora_lambda": (self.randlora_lambda, same, same),
                  "randlora_gamma": (self.randlora_gamma, same, same)}
        if self.spec(name).save_projection:  # PEFT saves the shared bases under every layer too
            layout.update(randlora_A=(self.randlora_A, same, same), randlora_B=(self.randlora_B, same, same))
        return layout

    def _describe(self, name: str) -> str:
        return f"RandLoRA r={self.spec(name).r}"

    def _factors(self, name: str) -> tuple[jax.Array, jax.Array]:
        """``(A_s [r n, min], B_f [max, n r])`` of adapter ``name``, float32."""
        n_in, n_out = self.kernel.get_value().shape
        small, large = min(n_in, n_out), max(n_in, n_out)
        lam = self.randlora_lambda[name].get_value().astype(jnp.float32)
        gamma = self.randlora_gamma[name].get_value().astype(jnp.float32)
        r, n = lam.shape
        a = self.randlora_A[name].get_value()[:, :n, :small].astype(jnp.float32)
        b = self.randlora_B[name].get_value()[:large, :n, :].astype(jnp.float32)
        return (lam[:, :, None] * a * gamma[None]).reshape(r * n, small), b.reshape(large, n * r)

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight``, in the kernel's ``[in, out]`` layout."""
        a, b = self._factors(name)
        n_in, n_out = self.kernel.get_value().shape
        delta = (b @ a) * self.spec(name).scaling  # [max, min]
        return delta.T if n_in <= n_out else delta

    def _update(self, x: jax.Array, name: str, spec: RandLoraSpec) -> jax.Array:
        a, b = self._factors(name)
        n_in, n_out = self.kernel.get_value().shape
        h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
        return spec.scaling * ((h @ a.T) @ b.T if n_in <= n_out else (h @ b) @ a)

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


def randlora_class_for(module: nnx.Module) -> type:
    if isinstance(module, RandLoraLayer):
        return type(module)
    return mixin_subclass(type(module), RandLoraLayer, "RandLoRA")
