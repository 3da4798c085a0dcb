"""Runs pytest as on a machine without PyTorch: ``torch`` and ``peft`` cannot be imported.

    python tests/scripts/without_torch.py [pytest arguments]    # default: tests -q -rs

The oracle tests (and the fixtures that save a checkpoint with PyTorch) skip, naming torch or peft;
every pure-JAX test still runs. One process (no ``-n``): the hiding applies to this interpreter
only, and the suite's subprocesses (the examples, the CLI) still see torch.

The modules are hidden as a missing install hides them: ``import torch`` raises
``ModuleNotFoundError`` and ``importlib.util.find_spec("torch")`` (transformers' check) gives
``None``, with nothing put in ``sys.modules`` (where ``datasets`` looks for an imported torch).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

HIDDEN = ("torch", "peft")


def _hidden(name: str) -> bool:
    return name.partition(".")[0] in HIDDEN


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by {__file__})", name=name)
        return None


_find_spec = importlib.util.find_spec


def _find_spec_hiding(name, package=None):
    return None if _hidden(name) else _find_spec(name, package)


sys.meta_path.insert(0, _Hide())
importlib.util.find_spec = _find_spec_hiding
assert not any(_hidden(name) for name in sys.modules), "torch or peft was imported before the hiding"

import pytest  # noqa: E402

if __name__ == "__main__":
    sys.exit(pytest.main(sys.argv[1:] or ["tests", "-q", "-rs"]))
