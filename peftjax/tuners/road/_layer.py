"""RoAd for Flax NNX: each pair of a layer's outputs rotated and scaled.

As in HF PEFT 0.22.0 (``peft/tuners/road/layer.py``), a targeted ``nnx.Linear`` computes
``y' = R y`` on its output ``y = base(x)`` (bias included): in each group of ``group_size``
outputs, element ``i`` of the first half pairs with element ``i`` of the second, and

    y' = y * c + rotate_half(y) * s,   rotate_half([y1, y2]) = [-y2, y1]  (per group)

with ``c``, ``s`` (``[out]``) from the trained ``road_theta`` and ``road_alpha``:
``alpha * cos(theta)`` and ``alpha * sin(theta)``, one pair of values per output pair
(``road_1``), per output (``road_2``), or separate angles and scales for ``c`` and ``s``
(``road_4``, PEFT's layout ``[groups, 2, group_size]``).

``merge`` folds ``R`` into the kernel and the bias (``R W``, ``R b``); ``unmerge`` multiplies by
``R^-1`` (PEFT's ``torch.linalg.inv``).

On disk (PEFT's keys): ``base_model.model.<path>.road_theta`` and ``.road_alpha``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.tuners.base import AdapterDictLayer, AdapterParam, layer_bias, mixin_subclass
from peftjax.tuners.base._rows import pick_rows, rows_of


@dataclasses.dataclass(frozen=True)
class RoadSpec:
    """Static settings of one RoAd adapter on one layer."""

    variant: str
    group_size: int


def parameter_size(variant: str, n_out: int) -> int:
    """The length of ``road_theta`` and ``road_alpha`` for a layer of ``n_out`` outputs."""
    return {"road_1": n_out // 2, "road_2": n_out, "road_4": 2 * n_out}[variant]


def road_columns(theta: jax.Array, alpha: jax.Array, spec: RoadSpec) -> tuple[jax.Array, jax.Array]:
    """``(c, s)`` (``[out]`` each): what multiplies ``y`` and ``rotate_half(y)`` (PEFT's ``_prepare_cols``)."""
    g = spec.group_size
    if spec.variant == "road_1":  # one value per pair: each half-group row repeated for the second half
        theta = jnp.repeat(theta.reshape(-1, g // 2), 2, axis=0).reshape(-1)
        alpha = jnp.repeat(alpha.reshape(-1, g // 2), 2, axis=0).reshape(-1)
        return alpha * jnp.cos(theta), alpha * jnp.sin(theta)
    if spec.variant == "road_2":
        return alpha * jnp.cos(theta), alpha * jnp.sin(theta)
    theta, alpha = theta.reshape(-1, 2, g), alpha.reshape(-1, 2, g)
    return (alpha[:, 0] * jnp.cos(theta[:, 0])).reshape(-1), (alpha[:, 1] * jnp.sin(theta[:, 1])).reshape(-1)


def apply_road(y: jax.Array, theta: jax.Array, alpha: jax.Array, spec: RoadSpec) -> jax.Array:
    """``R y`` along ``y``'s last axis (``[..., out]``, float32)."""
    c, s = road_columns(theta.astype(jnp.float32), alpha.astype(jnp.float32), spec)
    grouped = y.reshape(y.shape[:-1] + (-1, 2, spec.group_size // 2))
    rotated = jnp.stack([-grouped[..., 1, :], grouped[..., 0, :]], axis=-2).reshape(y.shape)
    lead = (1,) * (y.ndim - 1)
    return y * c.reshape(lead + c.shape) + rotated * s.reshape(lead + s.shape)


class RoadLayer(AdapterDictLayer):
    """Mixin marking a RoAd layer (``isinstance(m, RoadLayer)`` finds them)."""

    method_name = "RoAd"
    status_module_type = "road.Linear"
    bnb_status_prefix = "road."  # PEFT's own bitsandbytes layer: <prefix>Linear4bit
    weight_dicts = ("road_theta", "road_alpha")
    supports_adapter_rows = True  # a different adapter per batch row, as PEFT's _mixed_batch_forward

    def add_road(self, name: str, spec: RoadSpec, theta: jax.Array, alpha: jax.Array) -> None:
        self._check_new(name)
        self.road_theta[name] = AdapterParam(jnp.asarray(theta, jnp.float32))
        self.road_alpha[name] = AdapterParam(jnp.asarray(alpha, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"road_theta": (self.road_theta, same, same), "road_alpha": (self.road_alpha, same, same)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"RoAd {spec.variant}, group_size={spec.group_size}"

    def _road(self, name: str, y: jax.Array) -> jax.Array:
        return apply_road(y, self.road_theta[name].get_value(), self.road_alpha[name].get_value(), self.spec(name))

    def rotation_matrix(self, name: str) -> jax.Array:
        """``R`` (``[out, out]``, torch's orientation: ``y' = R y``)."""
        n_out = self.kernel.get_value().shape[1]
        return self._road(name, jnp.eye(n_out, dtype=jnp.float32)).T  # row k of the result: R e_k

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        mixed = rows_of(self)
        if mixed is not None:  # a mixed batch: each row rotated by its own adapter (the base's rows not at all)
            if not self._serves_rows():
                return y
            rows, names = mixed
            out, own = y.astype(jnp.float32), self.adapter_names()
            return pick_rows(rows, [self._road(n, out) if n in own else out for n in names], out).astype(y.dtype)
        live = self._live_adapters()
        if not live:
            return y
        out = y.astype(jnp.float32)
        for name, _ in live:
            out = self._road(name, out)
        return out.astype(y.dtype)

    def merge_adapter(self, name: str) -> None:
        self._fold(self.rotation_matrix(name))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._fold(jnp.linalg.inv(self.rotation_matrix(name)))
        self._mark_merged(name, False)

    def _fold(self, r: jax.Array) -> None:
        """``W <- R W`` and ``b <- R b`` (kernel ``[in, out]``: ``kernel R^T``)."""
        kernel = self.kernel.get_value()
        self.kernel.set_value((kernel.astype(jnp.float32) @ r.T).astype(kernel.dtype))
        bias = layer_bias(self)
        if bias is not None:
            b = bias.get_value()
            bias.set_value((r @ b.astype(jnp.float32)).astype(b.dtype))


def road_class_for(module) -> type:
    if isinstance(module, RoadLayer):
        return type(module)
    return mixin_subclass(type(module), RoadLayer, "RoAd")
