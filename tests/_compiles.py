"""Which XLA programs a block of code compiles (JAX's compile log), for the tests that count them."""

from __future__ import annotations

import contextlib
import logging

import jax


@contextlib.contextmanager
def compilations():
    """Yields the names of the programs compiled inside the block, in order (``step`` for
    ``jit(step)``; one compiled on the Trainer's background thread is ``"step ahead"``).

    JAX's caches are cleared first: a program this process compiled before (an eager operation
    another test ran) would otherwise not compile again, and so not show.
    """
    names: list[str] = []

    class Names(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Finished XLA compilation of "):
                what = message.split(" of ", 1)[1].split(" in ")[0]
                name = what[4:-1] if what.startswith("jit(") and what.endswith(")") else what
                ahead = " ahead" if record.threadName.startswith("peftjax-precompile") else ""
                names.append(name + ahead)

    handler, logger = Names(), logging.getLogger("jax")
    logger.addHandler(handler)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    jax.clear_caches()
    try:
        yield names
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(handler)
