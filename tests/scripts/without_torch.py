"""Runs pytest as on a machine without PyTorch: ``torch`` and ``peft`` are hidden from ``import``.

    python tests/scripts/without_torch.py [pytest arguments]    # default: tests -q -rs

The oracle tests (and the fixtures that save a checkpoint with PyTorch) skip, naming torch or peft;
every pure-JAX test still runs. One process (no ``-n``): the hiding applies to this interpreter only.
"""

from __future__ import annotations

import sys

for name in ("torch", "peft"):
    sys.modules[name] = None  # `import torch` raises ImportError; importlib.util.find_spec gives None

import pytest  # noqa: E402

if __name__ == "__main__":
    sys.exit(pytest.main(sys.argv[1:] or ["tests", "-q", "-rs"]))
