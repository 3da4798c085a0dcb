"""Every example in peftjax's docstrings runs as written (``doctest``, ELLIPSIS and whitespace
normalised): what the API documentation shows a user is executed, as the README's code is."""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for p in (ROOT / "peftjax").rglob("*.py") if ">>> " in p.read_text())


def test_the_modules_with_examples_are_found():
    assert len(MODULES) > 50 and "peftjax.training._rouge" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_every_docstring_example_runs_as_written(name):
    module = importlib.import_module(name)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name, globs=dict(vars(module))):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()[-4000:]
