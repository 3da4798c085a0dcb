"""The LyCORIS layer both LoHa and LoKr build on: a weight update added to a frozen ``nnx.Linear``.

As in HF PEFT 0.21 (``peft/tuners/lycoris_utils.py`` and the ``forward`` of ``loha/layer.py`` /
``lokr/layer.py``), a method only says how its factors make the update ``ΔW`` (torch layout
``[out, in]``, already scaled by ``alpha / r``); this mixin does the rest:

- forward: ``y = base(x) + x @ ΔWᵀ`` per live adapter, ``x`` cast to the adapter's dtype and the
  sum back to the base layer's output dtype (PEFT: ``result.to(previous_dtype)``);
- training (a :func:`peftjax.dropout_key` is active): ``module_dropout`` skips the whole adapter
  with that probability (one draw per layer and step, PEFT's ``torch.rand(1) > module_dropout``);
  ``rank_dropout`` keeps each output row of ``ΔW`` with probability ``1 - rank_dropout``
  (``torch.rand(out) > rank_dropout``), the kept rows divided by the fraction kept when the spec
  says so. Without a key (evaluation) neither applies, like PyTorch's ``eval()``;
- ``merge`` adds ``ΔWᵀ`` to the kernel (``[in, out]`` here) and ``unmerge`` subtracts it: exact up
  to float rounding.

The factors are stored in PEFT's own layout (``hada_w1_a`` is ``[out, r]`` here as in the file), so
the on-disk map is the identity.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp

from peftjax.nn._dropout import active_dropout_key, fold_key, keep_mask
from peftjax.nn._init import kaiming_uniform  # noqa: F401  (LoKr's init; re-exported)
from peftjax.tuners.base import AdapterDictLayer


@dataclasses.dataclass(frozen=True)
class LycorisSpec:
    """Static settings of one LoHa/LoKr adapter on one layer.

    Attributes:
      r: the rank (after ``rank_pattern``).
      alpha: the scaling numerator (after ``alpha_pattern``).
      rank_dropout: the probability of dropping an output row of ``ΔW`` while training.
      module_dropout: the probability of skipping the adapter for a training step.
      rank_dropout_scale: divide the kept rows by the fraction kept (LoHa always; LoKr's option).
    """

    r: int
    alpha: float
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = True

    @property
    def scaling(self) -> float:
        """``alpha / r``, PEFT's scaling (whether or not the factors are low-rank)."""
        return self.alpha / self.r


def rank_dropout_mask(key: jax.Array, n_out: int, spec: LycorisSpec) -> jax.Array:
    """PEFT's rank-dropout vector: ``(rand(out) > p)``, divided by its mean when ``rank_dropout_scale``.

    PEFT divides by ``drop.mean()`` even when every row is dropped (a 0/0, so NaN weights); here
    that rare case gives a zero update instead.
    """
    drop = keep_mask(key, (n_out,), 1.0 - spec.rank_dropout).astype(jnp.float32)
    if spec.rank_dropout_scale:
        mean = drop.mean()
        drop = jnp.where(mean > 0, drop / jnp.where(mean > 0, mean, 1.0), drop)
    return drop


class LycorisLayer(AdapterDictLayer):
    """The LoHa/LoKr mixin on ``nnx.Linear``: subclasses give :meth:`delta_weight` and :meth:`peft_layout`."""

    method_name = "LyCORIS"

    def delta_weight(self, name: str) -> jax.Array:
        """The scaled update ``ΔW`` of adapter ``name`` in torch layout ``[out, in]`` (float32)."""
        raise NotImplementedError

    def peft_layout(self, name: str):
        # the factors are kept in PEFT's layout: the file holds them as they are
        same = lambda v: v  # noqa: E731
        return {attr: (getattr(self, attr), same, same) for attr in self.weight_dicts}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"{self.method_name} adapter {name!r}, r={spec.r}"

    def _training_delta(self, name: str, spec: LycorisSpec, key: jax.Array | None) -> jax.Array:
        delta = self.delta_weight(name)
        if key is not None and spec.rank_dropout > 0:
            drop = rank_dropout_mask(fold_key(key, 1), delta.shape[0], spec)
            delta = delta * drop[:, None].astype(delta.dtype)
        return delta

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return y
        train_key = active_dropout_key()
        out = y
        for name, spec in live:
            key = None
            if train_key is not None:
                key = fold_key(train_key, zlib.crc32(f"{self.adapter_path}/{name}".encode()))
            delta = self._training_delta(name, spec, key)
            h = x.astype(delta.dtype) @ delta.T
            if key is not None and spec.module_dropout > 0:
                keep = keep_mask(fold_key(key, 0), (), 1.0 - spec.module_dropout)
                h = jnp.where(keep, h, jnp.zeros_like(h))
            out = out.astype(jnp.promote_types(out.dtype, h.dtype)) + h
        return out.astype(y.dtype)  # the base layer's dtype (PEFT: result.to(previous_dtype), x's dtype)

    def merge_adapter(self, name: str) -> None:
        """Adds ``ΔWᵀ`` to the kernel (no dropout: merging is for inference)."""
        w = self.kernel.get_value()
        self.kernel.set_value((w.astype(jnp.float32) + self.delta_weight(name).T).astype(w.dtype))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        """Subtracts ``ΔWᵀ`` from the kernel again."""
        w = self.kernel.get_value()
        self.kernel.set_value((w.astype(jnp.float32) - self.delta_weight(name).T).astype(w.dtype))
        self._mark_merged(name, False)
