"""LoHa on ``nnx.Linear``: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) * alpha / r`` (HF PEFT 0.21's ``loha/layer.py``).

The four factors are stored in PEFT's layout, per adapter name: ``hada_w1_a`` / ``hada_w2_a``
``[out, r]``, ``hada_w1_b`` / ``hada_w2_b`` ``[r, in]``; on disk
``base_model.model.<path>.hada_w1_a`` etc. (no ``.weight``: PEFT keeps them in a
``ParameterDict``). Forward, dropouts and merge are the shared :class:`LycorisLayer`'s; LoHa's
rank dropout always divides the kept rows by the fraction kept, as PEFT does.

Init (PEFT's): ``w1a``, ``w1b``, ``w2a`` Kaiming-uniform and ``w2b`` zero (a no-op adapter), or
with ``init_weights=False`` all four Kaiming-uniform.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.config import LoHaConfig
from peftjax.tuners.base import AdapterParam
from peftjax.tuners.lycoris import LycorisLayer, LycorisSpec, kaiming_uniform


def hadamard_delta(w1a, w1b, w2a, w2b, scaling: float) -> jax.Array:
    """``(w1a @ w1b) * (w2a @ w2b) * scaling``, in ``[out, in]`` (PEFT's ``make_weight``)."""
    return (w1a @ w1b) * (w2a @ w2b) * scaling


def loha_init(key: jax.Array, n_in: int, n_out: int, r: int, init_weights: bool) -> dict[str, jax.Array]:
    """PEFT's factors for one ``[out, in]`` weight: Kaiming-uniform, ``hada_w2_b`` zero when ``init_weights``."""
    k1a, k1b, k2a, k2b = jax.random.split(key, 4)
    w2b = kaiming_uniform(k2b, (r, n_in)) if not init_weights else jnp.zeros((r, n_in), jnp.float32)
    return {"hada_w1_a": kaiming_uniform(k1a, (n_out, r)), "hada_w1_b": kaiming_uniform(k1b, (r, n_in)),
            "hada_w2_a": kaiming_uniform(k2a, (n_out, r)), "hada_w2_b": w2b}


class LoHaLinear(LycorisLayer):
    """LoHa on ``nnx.Linear`` and its subclasses (``isinstance(m, LoHaLinear)`` finds them)."""

    method_name = "LoHa"
    weight_dicts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def add_loha(self, name: str, r: int, alpha: float, config: LoHaConfig, key: jax.Array) -> None:
        """Creates adapter ``name`` with PEFT's shapes and init."""
        self._check_new(name)
        n_in, n_out = self.kernel.get_value().shape
        for attr, value in loha_init(key, n_in, n_out, r, config.init_weights).items():
            getattr(self, attr)[name] = AdapterParam(value)
        spec = LycorisSpec(r=r, alpha=alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                           rank_dropout_scale=True)
        self._add_spec(name, spec)

    def delta_weight(self, name: str) -> jax.Array:
        return hadamard_delta(self.hada_w1_a[name].get_value(), self.hada_w1_b[name].get_value(),
                              self.hada_w2_a[name].get_value(), self.hada_w2_b[name].get_value(),
                              self.spec(name).scaling)
