"""Mixed batches: a different adapter for each row of one batch (PEFT's ``adapter_names``).

The assignment is model state, not a Python value: :func:`set_adapter_rows` gives every adapter
layer an :class:`AdapterRows` variable holding one index per row into ``names`` (the model's
adapters in a fixed order; ``len(names)`` means the base model, PEFT's ``"__base__"``). Under
``nnx.jit`` (or in the ``rest`` of :func:`peftjax.split`) it is traced like any other state, so
one compiled function serves every assignment of adapters to rows of a given batch size.

A layer then gathers each row's adapter weights from a stack of all of them, padded to the
largest rank with zeros (which changes no output), and runs one batched matmul per factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BASE = "__base__"


class AdapterRows(nnx.Variable):
    """Per-row adapter indices of a mixed batch (not trained, not saved)."""


def adapter_index(adapter_names: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """``adapter_names`` (one per row; ``"__base__"`` for none) as indices into ``names``.

    Raises:
      ValueError: an unknown adapter name (PEFT's message, with the known names).
    """
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names: expected a list of str, one per row, got {adapter_names!r}")
    unknown = sorted({n for n in adapter_names if n != BASE and n not in names})
    if unknown:
        raise ValueError(
            f"Trying to infer with non-existing adapter(s): {', '.join(unknown)} (adapters: {list(names)})"
        )
    position = {n: i for i, n in enumerate(names)}
    return np.asarray([position.get(n, len(names)) for n in adapter_names], np.int32)


def _row_holders(model: nnx.Module):
    """``(module, number of stacked layers or None)`` for every layer a mixed batch reaches."""
    from peftjax.nn._graph import iter_modules
    from peftjax.nn._scan import StackedLayers
    from peftjax.tuners.base._layer import AdapterLayer
    from peftjax.tuners.base._modules_to_save import SavedModule

    modules = list(iter_modules(model))
    stacks = {p: n.num_layers for p, n in modules if isinstance(n, StackedLayers)}
    for path, node in modules:
        if "modules_to_save" in path or not isinstance(node, AdapterLayer | SavedModule):
            continue
        stacked = next((n for p, n in stacks.items() if path[: len(p)] == p), None)
        yield node, stacked


def set_adapter_rows(model: nnx.Module, rows, names: Sequence[str]) -> None:
    """Makes ``model`` run a mixed batch: row ``i`` uses adapter ``names[rows[i]]``.

    Args:
      model: the adapted model (``peft_model.base_model``, or any model with adapters).
      rows: ``[batch]`` integer indices into ``names`` (``len(names)``: the base model), or a
        list of adapter names and ``"__base__"``.
      names: the adapters, in the order the indices refer to.
    """
    names = tuple(names)
    if len(rows) and isinstance(rows[0], str):
        rows = adapter_index(rows, names)
    rows = jnp.asarray(rows, jnp.int32)
    if rows.ndim != 1:
        raise ValueError(f"rows: expected one index per batch row ([batch]), found shape {list(rows.shape)}")
    holders = list(_row_holders(model))
    for module, _ in holders:
        if not getattr(module, "supports_adapter_rows", False) and set(names) & set(module.adapter_names()):
            method = getattr(module, "method_name", type(module).__name__)
            where = getattr(module, "adapter_path", "") or "the model"
            raise NotImplementedError(f"{where}: mixed adapter batches are supported for LoRA, IA³, RoAd and GLoRA "
                                      f"adapters; {method} adapters cannot serve a different adapter per row")
    for module, stacked in holders:
        value = rows if stacked is None else jnp.broadcast_to(rows, (stacked, *rows.shape))
        module.adapter_rows = AdapterRows(value)
        module.adapter_row_names = names


def clear_adapter_rows(model: nnx.Module) -> None:
    """Back to the active adapters for every row."""
    for module, _ in _row_holders(model):
        for attr in ("adapter_rows", "adapter_row_names"):
            if hasattr(module, attr):
                delattr(module, attr)


def rows_of(module) -> tuple[jax.Array, tuple[str, ...]] | None:
    """The mixed-batch assignment a layer carries, or ``None``."""
    rows = getattr(module, "adapter_rows", None)
    return None if rows is None else (rows.get_value(), module.adapter_row_names)


def per_row(rows: jax.Array, value: jax.Array, ndim: int) -> jax.Array:
    """A ``[batch]`` value shaped to broadcast over a ``ndim``-d output with the batch first."""
    return value.reshape(rows.shape + (1,) * (ndim - 1))


def pick_rows(rows: jax.Array, outputs: Sequence, default):
    """Row ``i`` of ``outputs[rows[i]]``, or of ``default`` past the end (pytrees of ``[batch, ...]``)."""
    out = default
    for i, candidate in enumerate(outputs):
        out = jax.tree.map(lambda c, o, i=i: jnp.where(per_row(rows, rows == i, c.ndim), c, o), candidate, out)
    return out
