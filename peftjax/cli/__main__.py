"""``python -m peftjax.cli``: the same as the ``peftjax`` command."""

import sys

from peftjax.cli import main

sys.exit(main())
