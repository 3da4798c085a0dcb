"""JAX's persistent compilation cache, which the ``Trainer`` turns on by default.

A second run of the same job (the same model, batch shapes, flags and jax version) then loads its
compiled steps from disk instead of compiling them again: on the main job's fine-tune that is
most of the 2-3 s each train step shape costs to compile on a 2-core host. A cold run pays the
compilation as before, plus writing the executables (milliseconds). JAX caches only programs
that took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s by default) to compile.

The directory is ``$PEFTJAX_CACHE_DIR/xla``, else ``$XDG_CACHE_HOME/peftjax/xla``, else
``~/.cache/peftjax/xla``, created private to the user (JAX trusts what it reads there). A cache
directory the user gave JAX (``jax_compilation_cache_dir``) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

# the directory this module pointed JAX at, if any (so that ``False`` can undo it)
_ours: str | None = None


def default_cache_dir() -> Path:
    """Where the Trainer keeps compiled executables by default."""
    base = os.environ.get("PEFTJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peftjax")
    return Path(base).expanduser() / "xla"


def use_compilation_cache(setting: bool | str | os.PathLike) -> str | None:
    """Points JAX's persistent compilation cache at ``setting``'s directory; returns the one in use.

    Args:
      setting: ``True`` for :func:`default_cache_dir` (unless JAX already has a directory the user
        set), a path for that directory, ``False`` for no cache from peftjax (one it turned on
        earlier in the process is turned off; the user's own is kept).

    Raises:
      OSError: an explicitly given directory cannot be created (the path is named). The default
        directory failing only leaves the cache off: it speeds up later runs, it never changes
        results.
    """
    current = jax.config.jax_compilation_cache_dir
    if setting is False:
        if current is not None and current == _ours:
            _point(None)
        return jax.config.jax_compilation_cache_dir
    if setting is True:
        if current is not None and current != _ours:
            return current  # the user's own choice
        path = default_cache_dir()
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            return current
    else:
        path = Path(setting).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise OSError(f"TrainingArguments.compilation_cache: cannot create {path}: {e}") from None
    if str(path) != current:
        _point(str(path))
    return str(path)


def _point(path: str | None) -> None:
    global _ours
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX settles whether a cache is in use at the process's first compilation; this makes it look again
    compilation_cache.reset_cache()
    _ours = path
