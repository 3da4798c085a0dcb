"""MiSS for Flax NNX: one small block shared by every input shard of a layer's weight.

As in HF PEFT 0.22.0 (``peft/tuners/miss/layer.py``), with the torch weight ``W [out, in]`` cut
into column shards of width ``r`` (the last one padded with zeros):

- balance (``init_weights`` ``True``/``False``) and mini: ``W'[o, i] = W[o, i] + B[i % r, o]`` with
  ``miss_block`` ``B [r, out]`` (mini: ``[r, mini_r]`` repeated ``out / mini_r`` times along the
  output); the forward is ``base(x) + (sum of x's shards) B``, ``miss_dropout`` on ``x`` while
  training;
- bat: ``miss_block`` ``B [out / r, r, r]``, ``W'_pq = W_pq + W_pq B_p + B_p`` for the ``r x r``
  block ``(p, q)`` of ``W`` (output shard ``p``, input shard ``q``); the forward adds ``x`` times
  that update (no dropout, as in PEFT). Several bat adapters apply in turn, each to the weight
  the previous one made.

``merge`` adds the update to the kernel (``[in, out]`` here); ``unmerge`` subtracts it, or for
bat solves ``W_pq = (W'_pq - B_p)(I + B_p)^-1`` as PEFT does.

On disk (PEFT's key): ``base_model.model.<path>.miss_block``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass


@dataclasses.dataclass(frozen=True)
class MissSpec:
    """Static settings of one MiSS adapter on one layer.

    Attributes:
      r: the shard width.
      variant: ``"balance"``, ``"mini"`` or ``"bat"``.
      mini_r: mini's block width.
      dropout: the input dropout of balance and mini while training.
    """

    r: int
    variant: str = "balance"
    mini_r: int = 1
    dropout: float = 0.0


def shared_block(block: jax.Array, spec: MissSpec, n_out: int) -> jax.Array:
    """The ``[r, out]`` block every input shard gets (mini's repeated along the output)."""
    return jnp.tile(block, (1, n_out // spec.mini_r)) if spec.variant == "mini" else block


def shard_sum(x: jax.Array, r: int) -> jax.Array:
    """``x [..., in]`` zero-padded to a multiple of ``r`` and its ``r``-wide shards summed: ``[..., r]``."""
    pad = -x.shape[-1] % r
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return jnp.sum(x.reshape(x.shape[:-1] + (x.shape[-1] // r, r)), axis=-2)


def bat_update(w: jax.Array, block: jax.Array, reverse: bool = False) -> jax.Array:
    """Bat's new torch weight ``[out, in]`` from ``w`` and ``block [out / r, r, r]`` (``reverse``: the
    weight before the update)."""
    p, r = block.shape[0], block.shape[-1]
    tiles = w.reshape(p, r, w.shape[1] // r, r).transpose(0, 2, 1, 3)  # [p, q, r, r]: W_pq
    b = block[:, None]  # B_p, over every q
    if reverse:
        new = (tiles - b) @ jnp.linalg.inv(jnp.eye(r, dtype=block.dtype)[None] + block)[:, None]
    else:
        new = tiles + tiles @ b + b
    return new.transpose(0, 2, 1, 3).reshape(w.shape)


class MissLayer(AdapterDictLayer):
    """Mixin marking a MiSS layer (``isinstance(m, MissLayer)`` finds them)."""

    method_name = "MiSS"
    status_module_type = "miss.MissLinear"
    weight_dicts = ("miss_block",)
    reports_quantization_backend = True  # PEFT's status names bitsandbytes' backend for it

    def add_miss(self, name: str, spec: MissSpec, value: jax.Array) -> None:
        self._check_new(name)
        self.miss_block[name] = AdapterParam(jnp.asarray(value, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        return {"miss_block": (self.miss_block, lambda v: v, lambda v: v)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"MiSS {spec.variant} r={spec.r}" + (f", mini_r={spec.mini_r}" if spec.variant == "mini" else "")

    def _torch_weight(self) -> jax.Array:
        return self.kernel.get_value().astype(jnp.float32).T

    def _update(self, name: str, w: jax.Array) -> jax.Array:
        """The ``[out, in]`` weight adapter ``name`` makes of ``w``."""
        spec, block = self.spec(name), self.miss_block[name].get_value().astype(jnp.float32)
        if spec.variant == "bat":
            return bat_update(w, block)
        n_out, n_in = w.shape
        tiled = jnp.tile(shared_block(block, spec, n_out), (-(-n_in // spec.r), 1))[:n_in]  # [in, out]
        return w + tiled.T

    def delta_weight(self, name: str) -> jax.Array:
        """``W' - W`` of adapter ``name`` on the current weight, torch's ``[out, in]`` (float32)."""
        w = self._torch_weight()
        return self._update(name, w) - w

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return y
        out = y.astype(jnp.float32)
        w0 = w = None
        for name, spec in live:
            if spec.variant == "bat":  # the update of the weight the earlier ones made
                w0 = self._torch_weight() if w0 is None else w0
                w = self._update(name, w0 if w is None else w)
                continue
            block = shared_block(self.miss_block[name].get_value(), spec, y.shape[-1])
            h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(block.dtype)
            out = out + shard_sum(h, spec.r) @ block
        if w is not None:
            out = out + x.astype(jnp.float32) @ (w - w0).T
        return out.astype(y.dtype)

    def merge_adapter(self, name: str) -> None:
        self._set_torch_weight(self._update(name, self._torch_weight()))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        w = self._torch_weight()
        if self.spec(name).variant == "bat":
            w = bat_update(w, self.miss_block[name].get_value().astype(jnp.float32), reverse=True)
        else:
            w = w - (self._update(name, w) - w)
        self._set_torch_weight(w)
        self._mark_merged(name, False)

    def _set_torch_weight(self, w: jax.Array) -> None:
        kernel = self.kernel.get_value()
        self.kernel.set_value(w.T.astype(kernel.dtype))


def miss_class_for(module) -> type:
    if isinstance(module, MissLayer):
        return type(module)
    return mixin_subclass(type(module), MissLayer, "MiSS")
