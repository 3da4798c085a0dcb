"""Writing a file so that its name never holds a half-written one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Calls ``write(temporary path)`` beside ``path``, then renames the result over ``path``
    (atomic on POSIX and Windows): a process killed mid-write leaves ``path`` as it was. The
    temporary file is removed if ``write`` fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
