"""Whether the adapter being added will take its state from a file (``PeftModel.from_pretrained``
and ``load_adapter``), for methods whose initial state only a file can give: SHiRA's mask from a
mask function PEFT users supply, which peftjax cannot run, comes with the file's ``shira_indices``."""

from __future__ import annotations

import contextlib
import contextvars

_FROM_FILE: contextvars.ContextVar[bool] = contextvars.ContextVar("peftjax_adapter_from_file", default=False)


@contextlib.contextmanager
def adapter_from_file():
    """Within it, adapters being added are filled from a file right after."""
    token = _FROM_FILE.set(True)
    try:
        yield
    finally:
        _FROM_FILE.reset(token)


def adding_from_file() -> bool:
    return _FROM_FILE.get()
