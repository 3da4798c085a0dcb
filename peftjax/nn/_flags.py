"""Thread-local switches that code being traced reads, raised by a context manager around the call."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class TraceFlag:
    """A per-thread boolean: true inside :meth:`raised` blocks (nested blocks restore on exit)."""

    def __init__(self) -> None:
        self._state = threading.local()

    @contextlib.contextmanager
    def raised(self) -> Iterator[None]:
        previous = self.is_raised()
        self._state.on = True
        try:
            yield
        finally:
            self._state.on = previous

    def is_raised(self) -> bool:
        return getattr(self._state, "on", False)
