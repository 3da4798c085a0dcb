"""Giving freed host memory back to the operating system.

Two things keep a JAX process's resident memory above what it uses, most visibly on CPU:

- XLA's compiler allocates and frees a few hundred MiB while it compiles a train step; glibc's
  allocator keeps the freed pages in its arenas, so the resident size after compiling stays
  at the compiler's peak for the rest of the run.
- Every distinct eager operation (a ``jnp.stack`` of a new shape while loading, a random
  initialiser while adding adapters) is compiled once and its executable is cached: about
  1.5 MiB each on XLA:CPU, tens of MiB after loading a model and adding adapters.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

import jax


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_host_memory(*, clear_compiled: bool = False, generation: int = 2) -> bool:
    """Returns the host memory the allocator holds free to the operating system.

    The recipe for a lean process: once the model is loaded and its adapters added, call it
    with ``clear_compiled``; then compile the step ahead and call it again before the first step
    runs, so the compiler's freed heap and the step's buffers are never resident together. A step
    from ``make_train_step`` (and so :class:`Trainer`) does that second part on its first call. In ``benchmarks/speed_vs_peft.py`` the recipe takes the peak resident
    memory from 0.90 GiB to 0.68 GiB (benchmarks/README.md).

    Args:
      clear_compiled: also drop every executable JAX has cached (``jax.clear_caches()``):
        loading's and initialisation's one-off operations, but also any function already
        compiled, which then compiles again on its next call.
      generation: the oldest generation of Python objects collected first (``gc.collect``'s
        argument): 2, every object; 1, the younger ones, where most of what tracing and lowering
        a function leaves behind is, in milliseconds where a full collection of a large process
        (torch, transformers and a test suite's models imported) takes a third of a second.

    Returns:
      Whether memory could be trimmed (glibc); elsewhere only ``clear_compiled`` acts.
    """
    if clear_compiled:
        jax.clear_caches()
    gc.collect(generation)
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
