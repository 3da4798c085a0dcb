"""Whether the function being traced is partitioned over a device mesh by peftjax.

A layer may pick the formulation that is best on one device where it would make XLA's SPMD
partitioner move sharded weights: LoRA's joint matmul (``tuners/lora/_math.joint_matmul``)
concatenates the frozen kernel with ``lora_B`` along the input axis, the axis a row-parallel or
fully sharded kernel is split on. peftjax's sharded steps (``make_train_step(..., mesh=)``, the
``Trainer`` on a mesh) trace under :func:`partitioned`, and those layers keep their plain form
there. A step a user jits with shardings of their own can enter it too.
"""

from __future__ import annotations

import functools

from peftjax.nn._flags import TraceFlag

_flag = TraceFlag()


def partitioned():
    """Marks what is traced inside the block as partitioned over a mesh (see the module docstring)."""
    return _flag.raised()


def is_partitioned() -> bool:
    """Whether the current trace runs inside :func:`partitioned`."""
    return _flag.is_raised()


def traced_partitioned(fn):
    """``fn`` traced inside :func:`partitioned` (for ``jax.jit`` with shardings)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with partitioned():
            return fn(*args, **kwargs)

    return wrapped
