"""Uni-LoRA for Flax NNX: LoRA factors whose entries are read from the model's one trained vector.

As in HF PEFT 0.22.0 (``peft/tuners/unilora/layer.py``), a targeted linear layer holds frozen
positions ``unilora_indices_A [r, in]``, ``unilora_indices_B [out, r]`` into the model's
``unilora_theta_d [d]`` (one variable every layer references, so its gradient sums theirs) and
frozen scales of the same shapes:

    A = theta_d[indices_A] * scales_A,   B = theta_d[indices_B] * scales_B
    y = base(x) + dropout(x) A^T B^T

On disk (PEFT's keys): ``base_model.unilora_theta_d``, and with ``save_indices`` every layer's
``<path>.unilora_indices_A`` / ``_B`` (int64) and ``.unilora_scales_A`` / ``_B``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.tuners.base import AdapterParam, LowRankFactorsLayer, mixin_subclass


class UniLoraPositions(nnx.Variable):
    """A layer's frozen positions into ``theta_d``, or their scales (PEFT's buffers)."""


@dataclasses.dataclass(frozen=True)
class UniLoraSpec:
    """Static settings of one Uni-LoRA adapter on one layer."""

    r: int
    dropout: float = 0.0
    save_indices: bool = False


def unilora_index(count: int, theta_d_length: int, seed: int) -> np.ndarray:
    """PEFT's balanced assignment of ``count`` entries to ``theta_d``'s positions: each position
    ``floor(count / d)`` times, ``count % d`` distinct ones once more, shuffled (NumPy's
    ``default_rng(seed)``, the same draws as PEFT's ``generate_index``)."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(theta_d_length), count // theta_d_length)
    if count % theta_d_length:
        data = np.concatenate([data, rng.choice(theta_d_length, size=count % theta_d_length, replace=False)])
    rng.shuffle(data)
    return data


class UniLoraLayer(LowRankFactorsLayer):
    """Mixin marking a Uni-LoRA layer (``isinstance(m, UniLoraLayer)`` finds them)."""

    method_name = "Uni-LoRA"
    status_module_type = "Linear"  # PEFT's layer keeps torch's repr
    weight_dicts = ("unilora_theta_d",)  # the model's, shared
    cache_dicts = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")

    def add_unilora(self, name: str, spec: UniLoraSpec, theta_d: AdapterParam, n_in: int, n_out: int) -> None:
        """Adds the adapter with placeholder positions (``set_positions`` fills them model-wide)."""
        self._check_new(name)
        self.unilora_theta_d[name] = theta_d
        for attr, shape in (("A", (spec.r, n_in)), ("B", (n_out, spec.r))):
            getattr(self, f"unilora_indices_{attr}")[name] = UniLoraPositions(jnp.zeros(shape, jnp.int32))
            getattr(self, f"unilora_scales_{attr}")[name] = UniLoraPositions(jnp.zeros(shape, jnp.float32))
        self._add_spec(name, spec)

    def set_positions(self, name: str, indices_a, indices_b, scales_a, scales_b) -> None:
        for attr, value in (("indices_A", indices_a), ("indices_B", indices_b), ("scales_A", scales_a),
                            ("scales_B", scales_b)):
            store = getattr(self, f"unilora_{attr}")[name]
            store.set_value(jnp.asarray(value, store.get_value().dtype))

    def peft_layout(self, name: str):
        if not self.spec(name).save_indices:
            return {}
        same = lambda v: v  # noqa: E731
        as_int64 = lambda v: v.astype(np.int64)  # noqa: E731  (PEFT's torch.long)
        return {"unilora_indices_A": (self.unilora_indices_A, as_int64, same),
                "unilora_indices_B": (self.unilora_indices_B, as_int64, same),
                "unilora_scales_A": (self.unilora_scales_A, same, same),
                "unilora_scales_B": (self.unilora_scales_B, same, same)}

    def _describe(self, name: str) -> str:
        return f"Uni-LoRA r={self.spec(name).r}"

    def factors(self, name: str) -> tuple[jax.Array, jax.Array]:
        """``(A [r, in], B [out, r])`` of adapter ``name``, float32."""
        theta = self.unilora_theta_d[name].get_value().astype(jnp.float32)
        a = theta[self.unilora_indices_A[name].get_value()] * self.unilora_scales_A[name].get_value()
        b = theta[self.unilora_indices_B[name].get_value()] * self.unilora_scales_B[name].get_value()
        return a.astype(jnp.float32), b.astype(jnp.float32)


def unilora_class_for(module: nnx.Module) -> type:
    if isinstance(module, UniLoraLayer):
        return type(module)
    return mixin_subclass(type(module), UniLoraLayer, "UniLora")
