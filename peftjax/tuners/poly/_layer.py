"""Poly (Polytropon) and multi-head routing for Flax NNX, as HF PEFT 0.22.0 computes them.

A targeted ``nnx.Linear`` holds ``n_skills`` LoRA pairs, each cut into ``n_splits`` heads:
``poly_lora_A [splits, skills, in / splits, r]``, ``poly_lora_B [splits, skills, r, out / splits]``,
and a router, ``poly_router.module_logits [tasks, splits * skills]``. For a row of task ``t`` the
mixing weights are ``sigmoid(logits[t])`` per split, normalised over the skills (while training, a
relaxed Bernoulli sample at temperature 1 under the dropout key, as ``RelaxedBernoulli.rsample``);
the row's pair is the weighted sum of the skills' (heads concatenated) and

    y = base(x) + (x @ A_t) @ B_t / r

The update differs per row, so it is never merged (PEFT has no merge either).

On disk (PEFT's keys, its layouts): ``<path>.poly_lora_A``, ``<path>.poly_lora_B``,
``<path>.poly_router.module_logits``.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.nn._dropout import active_dropout_key, fold_key
from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass, outside_tasks, task_id_rows, task_rows
from peftjax.tuners.poly._tasks import current_task_ids

EPS = 1e-12  # PEFT's, in the normalisation of the mixing weights


@dataclasses.dataclass(frozen=True)
class PolySpec:
    """Static settings of one Poly adapter on one layer."""

    r: int
    n_tasks: int
    n_skills: int
    n_splits: int


def _same(v):
    return v


def mixing_weights(logits: jax.Array, task_ids, spec: PolySpec, key: jax.Array | None) -> jax.Array:
    """``[rows, splits, skills]``: each row's task's routing weights, normalised over the skills.

    Raises:
      ValueError: no ``task_ids`` with several tasks, ids that are not 1-D integers, or (known on
        the host) ids outside ``[0, n_tasks)``; traced ids out of range give NaN weights.
    """
    ids = _checked(task_id_rows(task_ids, spec.n_tasks, f"task_ids should not be None: this Poly adapter has "
                                                        f"n_tasks={spec.n_tasks}; pass model(..., task_ids=...) "
                                                        f"with each row's task"), spec)
    chosen = task_rows(logits, ids).reshape(-1, spec.n_splits, spec.n_skills).astype(jnp.float32)
    if key is None:
        w = jax.nn.sigmoid(chosen)
    else:  # RelaxedBernoulli(temperature=1, logits).rsample(), torch's clamping included
        tiny = jnp.finfo(jnp.float32).eps
        u = jax.random.uniform(key, chosen.shape, jnp.float32, tiny, 1.0 - tiny)
        w = jnp.clip(jax.nn.sigmoid(chosen + jnp.log(u) - jnp.log1p(-u)), tiny, 1.0 - tiny)
    return w / (w.sum(-1, keepdims=True) + EPS)


def check_task_ids(task_ids, model) -> np.ndarray:
    """``task_ids`` as host integers, checked against every active Poly adapter of ``model``.

    Raises:
      ValueError: not 1-D integers, or an id outside an adapter's ``[0, n_tasks)``.
    """
    from peftjax.tuners.base import named_modules

    ids = np.asarray(task_ids)
    specs = {m.spec(n) for m in named_modules(model).values() if isinstance(m, PolyLayer) for n in m.adapter_active}
    for spec in specs:
        _checked(task_id_rows(ids, spec.n_tasks, ""), spec)
    return ids


def _checked(ids, spec: PolySpec):
    if outside_tasks(ids, spec.n_tasks):
        raise ValueError(f"Only {spec.n_tasks} tasks available. Found task id = {int(ids.max())} "
                         f"(task_ids {ids.tolist()})")
    return ids


class PolyLayer(AdapterDictLayer):
    """Mixin marking a Poly layer (``isinstance(m, PolyLayer)`` finds them)."""

    method_name = "Poly"
    status_module_type = "poly.Linear"
    weight_dicts = ("poly_lora_A", "poly_lora_B", "poly_router_logits")

    def add_poly(self, name: str, spec: PolySpec, a, b, logits) -> None:
        self._check_new(name)
        self.poly_lora_A[name] = AdapterParam(jnp.asarray(a, jnp.float32))
        self.poly_lora_B[name] = AdapterParam(jnp.asarray(b, jnp.float32))
        self.poly_router_logits[name] = AdapterParam(jnp.asarray(logits, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        return {"poly_lora_A": (self.poly_lora_A, _same, _same), "poly_lora_B": (self.poly_lora_B, _same, _same),
                "poly_router.module_logits": (self.poly_router_logits, _same, _same)}

    def _describe(self, name: str) -> str:
        s = self.spec(name)
        return f"Poly r={s.r} n_skills={s.n_skills} n_splits={s.n_splits} n_tasks={s.n_tasks}"

    def _update(self, x: jax.Array, name: str, spec: PolySpec) -> jax.Array:
        key = active_dropout_key()
        if key is not None:
            key = fold_key(key, zlib.crc32(f"{self.adapter_path}/{name}".encode()))
        w = mixing_weights(self.poly_router_logits[name].get_value(), current_task_ids(), spec, key)
        a = jnp.einsum("bqs,qsdr->bqdr", w, self.poly_lora_A[name].get_value())  # [rows, splits, in/q, r]
        b = jnp.einsum("bqs,qsrd->bqrd", w, self.poly_lora_B[name].get_value())  # [rows, splits, r, out/q]
        n, rows = w.shape[0], x.shape[0]
        a = a.reshape(n, -1, spec.r)
        b = b.transpose(0, 2, 1, 3).reshape(n, spec.r, -1)
        h = x.astype(jnp.float32)
        if n == 1:  # one task for every row (a single-task adapter called without task_ids)
            return (h @ a[0]) @ b[0] / spec.r
        if n != rows:
            raise ValueError(f"task_ids: expected one task id per row ({rows}), got {n}")
        h = h.reshape(rows, -1, x.shape[-1])
        out = jnp.einsum("bnr,brd->bnd", jnp.einsum("bni,bir->bnr", h, a), b) / spec.r
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))

    def merge_adapter(self, name: str) -> None:
        raise NotImplementedError(
            f"{self.adapter_path}: a Poly adapter's update depends on each row's task, so it cannot be merged into "
            "the base weights (PEFT has no merge for Poly either)")

    def unmerge_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{self.adapter_path}: Poly adapters are never merged")


def poly_class_for(module) -> type:
    if isinstance(module, PolyLayer):
        return type(module)
    return mixin_subclass(type(module), PolyLayer, "Poly")
