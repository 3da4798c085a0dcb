"""LoKr on ``nnx.Linear``: ``ΔW = kron(w1, w2) * alpha / r`` (HF PEFT 0.21's ``lokr/layer.py``).

:func:`factorization` splits ``out = a * b`` and ``in = c * d``; ``w1`` is ``[a, c]`` and ``w2``
``[b, d]``, so ``kron(w1, w2)`` is ``[out, in]``. Each factor is stored whole (``lokr_w1``,
``lokr_w2``) or as a rank-``r`` product (``lokr_w1_a [a, r] @ lokr_w1_b [r, c]``,
``lokr_w2_a [b, r] @ lokr_w2_b [r, d]``), by PEFT's rule: ``w2`` is a product when
``r < max(b, d) / 2``; ``w1`` only with ``decompose_both`` and ``r < max(a, c) / 2``. The scaling
is ``alpha / r`` either way. Keys on disk: ``base_model.model.<path>.lokr_w1`` etc. (no
``.weight``), in PEFT's layout, which is also the layout kept here.

Init (PEFT's): ``True``: ``w1`` (or ``w1_a``) zero, the rest Kaiming-uniform (a no-op adapter);
``False``: all Kaiming-uniform; ``"lycoris"``: ``w2`` (or ``w2_b``) zero, the rest
Kaiming-uniform. Rank dropout divides by the fraction kept only with ``rank_dropout_scale``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.config import LoKrConfig
from peftjax.tuners.base import AdapterParam
from peftjax.tuners.lycoris import LycorisLayer, LycorisSpec, kaiming_uniform


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Splits ``dimension`` into ``(m, n)``, ``m <= n``, ``m * n == dimension``: PEFT's (LyCORIS's) rule.

    A positive ``factor`` that divides ``dimension`` gives ``(factor, dimension // factor)``
    as is. Otherwise ``m`` grows through the divisors of ``dimension`` while ``m + n`` does not
    grow and ``m`` stays ``<= factor`` (``-1``: no bound, so the pair nearest the square root).

    >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
    ((16, 16), (8, 16), (1, 127), (4, 32))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


def kron_delta(w1: jax.Array, w2: jax.Array, scaling: float) -> jax.Array:
    """``kron(w1, w2) * scaling`` (PEFT's ``make_kron`` for 2-D factors)."""
    return jnp.kron(w1, w2) * scaling


def lokr_init(key: jax.Array, n_in: int, n_out: int, r: int, config: LoKrConfig) -> dict[str, jax.Array]:
    """PEFT's factors for one ``[out, in]`` weight: its factor shapes, decomposition choice and init."""
    (a, b), (c, d) = factorization(n_out, config.decompose_factor), factorization(n_in, config.decompose_factor)
    use_w1 = not (config.decompose_both and r < max(a, c) / 2)
    use_w2 = not (r < max(b, d) / 2)
    init = config.init_weights
    keys = iter(jax.random.split(key, 4))

    def param(shape, zero: bool):
        k = next(keys)
        return jnp.zeros(shape, jnp.float32) if zero else kaiming_uniform(k, shape)

    zero_w1 = init is True  # PEFT's default zeroes w1 (or w1_a); "lycoris" zeroes w2 (or w2_b)
    zero_w2 = init == "lycoris"
    out = {}
    if use_w1:
        out["lokr_w1"] = param((a, c), zero_w1)
    else:
        out["lokr_w1_a"] = param((a, r), zero_w1)
        out["lokr_w1_b"] = param((r, c), False)
    if use_w2:
        out["lokr_w2"] = param((b, d), zero_w2)
    else:
        out["lokr_w2_a"] = param((b, r), False)
        out["lokr_w2_b"] = param((r, d), zero_w2)
    return out


def lokr_delta(weights, scaling: float) -> jax.Array:
    """``ΔW`` ``[out, in]`` from one adapter's factors (``{"lokr_w1": ..} or {"lokr_w1_a": .., "lokr_w1_b": ..}``, same for w2)."""

    def factor(whole: str) -> jax.Array:
        return weights[whole] if whole in weights else weights[whole + "_a"] @ weights[whole + "_b"]

    return kron_delta(factor("lokr_w1"), factor("lokr_w2"), scaling)


class LoKrLinear(LycorisLayer):
    """LoKr on ``nnx.Linear`` and its subclasses (``isinstance(m, LoKrLinear)`` finds them)."""

    method_name = "LoKr"
    weight_dicts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    def add_lokr(self, name: str, r: int, alpha: float, config: LoKrConfig, key: jax.Array) -> None:
        """Creates adapter ``name`` with PEFT's factor shapes, decomposition choice and init."""
        self._check_new(name)
        n_in, n_out = self.kernel.get_value().shape
        for attr, value in lokr_init(key, n_in, n_out, r, config).items():
            getattr(self, attr)[name] = AdapterParam(value)
        spec = LycorisSpec(r=r, alpha=alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                           rank_dropout_scale=config.rank_dropout_scale)
        self._add_spec(name, spec)

    def delta_weight(self, name: str) -> jax.Array:
        weights = {w: getattr(self, w)[name].get_value() for w in self.weight_dicts if name in getattr(self, w)}
        return lokr_delta(weights, self.spec(name).scaling)

    def _describe(self, name: str) -> str:
        parts = [w for w in ("lokr_w1", "lokr_w2") if name in getattr(self, w)]
        whole = " and ".join(parts) or "neither factor"
        return f"{LycorisLayer._describe(self, name)}, {whole} whole (decompose_both / r decide which)"
