"""Compiling the shapes a run will need on a background thread while it trains.

Bucketed batches give a jitted step a few shapes; each compiles on its first call, and on a CPU
host a compile takes about as long as ten small steps. The ``Trainer`` knows every batch it will
draw (:meth:`Batcher.batch_shapes`), so it hands the shapes after the first to a
:class:`Precompiler`: one thread lowers and compiles them in the order the run first needs them
(JAX caches the executables, so the step's later calls find them), and the loop waits for a
shape's compilation only if it arrives there first. Compilation mostly runs while the step's
element-wise kernels leave a core idle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np


def abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves for ``tree``'s arrays (what ``lower`` needs, no buffers)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def signature(batch: dict) -> tuple:
    """A batch's shapes and dtypes: equal signatures, one compiled step."""
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))


def first_batch_of_each_shape(batcher, start: int, stop: int) -> list[dict]:
    """The first batch of each distinct shape among ``batcher``'s batches ``start`` to
    ``stop`` (counted over epochs: ``start = epoch * num_batches + index``), in order of first use;
    at most the two epochs from ``start``'s are read."""
    firsts: dict[tuple, tuple[int, int]] = {}
    epoch, position = divmod(start, batcher.num_batches)
    for e in range(epoch, epoch + 2):
        first = position if e == epoch else 0
        left = max(stop - e * batcher.num_batches - first, 0)
        for i, shape in enumerate(batcher.batch_shapes(e, first)[:left]):
            firsts.setdefault(shape, (e, first + i))
    return [next(batcher.batches(e, start=i)) for e, i in firsts.values()]


class Precompiler:
    """Compiles ``(key, lower)`` jobs one by one on a worker thread, from :meth:`start` on (the
    loop calls it once its first step has compiled, so that compilation, which the loop waits
    for, has the cores to itself); :meth:`wait` blocks until a key's job is done (a job that
    fails is left to the caller's own call, which raises)."""

    def __init__(self, jobs: Iterable[tuple[Hashable, Callable[[], Any]]]):
        self._futures: dict[Hashable, Future] = {}
        self._started = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftjax-precompile")
        self._pool.submit(self._started.wait)
        for key, lower in jobs:
            if key not in self._futures:
                self._futures[key] = self._pool.submit(_compile, lower)

    def start(self) -> None:
        """Lets the worker begin (idempotent)."""
        self._started.set()

    def wait(self, key: Hashable) -> None:
        """Returns once ``key``'s compilation (if one was scheduled) has finished; starts the
        worker if it had not been."""
        future = self._futures.pop(key, None)
        if future is not None:
            self.start()
            future.result()

    def close(self) -> None:
        """Drops the jobs not started; one in progress finishes on its thread."""
        self.start()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _compile(lower: Callable[[], Any]) -> None:
    try:
        lower().compile()
    except Exception:  # noqa: BLE001 - the step's own call compiles again and reports the error
        pass
