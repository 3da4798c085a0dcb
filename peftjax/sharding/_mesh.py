"""Device meshes and batch placement: which mesh axes split the batch.

The batch is split over the data-parallel axes, ``data`` and ``fsdp`` (FSDP is data parallelism
whose weights are also split); the ``model`` axis (tensor parallelism) sees the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP, MODEL = "data", "fsdp", "model"
DATA_AXES = (DATA, FSDP)


def make_mesh(shape: Mapping[str, int], *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A device mesh from ``{axis name: size}``, over all devices (of every process) by default.

    One size may be ``-1``: it takes the devices the others leave. The axes are
    ``AxisType.Auto``: peftjax's rules are sharding annotations that XLA propagates through
    the model (GSPMD), and the bundled models carry no explicit-sharding annotations.

    >>> mesh = make_mesh({"data": 2, "model": 4})  # doctest: +SKIP
    >>> dict(mesh.shape)  # doctest: +SKIP
    {'data': 2, 'model': 4}

    Raises:
      ValueError: the sizes do not multiply to the device count, or a size is not positive.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = tuple(shape), [int(s) for s in shape.values()]
    if not names:
        raise ValueError("make_mesh needs at least one axis, e.g. {'data': -1}")
    bad = [f"{n}={s}" for n, s in zip(names, sizes) if s == 0 or s < -1]
    if bad or sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes must be positive (at most one -1); got {dict(shape)}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices; there are {len(devices)} "
            f"(on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's data-parallel axes (``data``, ``fsdp``), in that order."""
    return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the data-parallel axis sizes."""
    return math.prod(mesh.shape[a] for a in data_axes(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """A copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Rows split over the data-parallel axes, other dimensions whole (scalars replicated)."""
    axes = data_axes(mesh)
    if ndim == 0 or not axes:
        return replicated(mesh)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Places a batch (a pytree of arrays, rows first) with its rows split over the data axes.

    Args:
      batch: the global batch (the same on every process), or with ``process_local=True`` this
        process's rows only.
      mesh: the mesh.
      process_local: each process passes its own rows; the global batch is their concatenation
        in process order (``jax.make_array_from_process_local_data``).

    Raises:
      ValueError: the global row count is not divisible by the data-parallel size.
    """
    n = data_parallel_size(mesh)

    def place(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if process_local:
            return jax.make_array_from_process_local_data(sharding, x)
        if x.ndim and x.shape[0] % n:
            raise ValueError(
                f"a batch of {x.shape[0]} rows cannot be split over {n} data-parallel devices "
                f"(axes {data_axes(mesh)}); use a multiple of {n}"
            )
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, batch)
