"""Each row's task, for the methods that route by it (Poly, multitask prompt tuning)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def task_id_rows(task_ids, n_tasks: int, missing: str):
    """The rows' task ids, 1-D integers: traced ids as they are, others on the host; none given,
    task 0 for every row (``[0]``) where there is one task.

    Raises:
      ValueError: ``missing`` where none are given and there are several tasks; ids that are not
        1-D integers.
    """
    if task_ids is None:
        if n_tasks != 1:
            raise ValueError(missing)
        return np.zeros((1,), np.int32)
    ids = task_ids if isinstance(task_ids, jax.core.Tracer) else np.asarray(task_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"task_ids: expected a 1-D integer array (a task per row), got {ids.dtype} "
                         f"of shape {tuple(ids.shape)}")
    return ids


def outside_tasks(ids, n_tasks: int) -> bool:
    """Whether host ids fall outside ``[0, n_tasks)`` (traced ids are not known here: see :func:`task_rows`)."""
    return isinstance(ids, np.ndarray) and ids.size > 0 and not (0 <= ids.min() and ids.max() < n_tasks)


def task_rows(table: jax.Array, ids) -> jax.Array:
    """``table[ids]`` along the task axis; a traced id out of range gives a NaN row, never another task's."""
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)
