"""Loading a checkpoint's tokenizer as ``AutoTokenizer`` would, without importing torch.

``transformers.AutoTokenizer`` goes through transformers' config classes, which import torch
whenever it is installed (seconds and a quarter of a gigabyte of host memory in a JAX process).
The tokenizer classes themselves do not: :func:`load_tokenizer` reads ``tokenizer_class`` from
``tokenizer_config.json`` and loads that class directly, falling back to ``AutoTokenizer`` only
when the directory does not name a class transformers exports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                      "*.model", "config.json")


def tokenizer_class_name(directory: str | os.PathLike) -> str | None:
    """The ``tokenizer_class`` that ``tokenizer_config.json`` in ``directory`` names, if any."""
    file = Path(directory) / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        name = json.loads(file.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{file} is not a JSON object: {e}") from None
    return name if isinstance(name, str) else None


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None, **kwargs):
    """The tokenizer of a model directory or Hub repo id, the class ``AutoTokenizer`` picks.

    Args:
      name_or_path: a directory with the tokenizer files, or a Hub repo id (fetched into the Hub
        cache; ``HF_HUB_OFFLINE=1`` reads only the cache).
      revision: the repo's branch, tag or commit.
      **kwargs: passed to the tokenizer's ``from_pretrained`` (``padding_side="left"``, ...).

    Raises:
      FileNotFoundError: ``name_or_path`` has no tokenizer files (names the path).
    """
    import transformers

    from peftjax.io._hub import resolve

    directory = resolve(name_or_path, revision=revision, allow_patterns=list(TOKENIZER_PATTERNS))
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    name = tokenizer_class_name(directory)
    candidates = [] if name is None else list(dict.fromkeys([name if name.endswith("Fast") else f"{name}Fast", name]))
    for candidate in candidates:
        try:
            cls = getattr(transformers, candidate)
        except (AttributeError, ImportError):  # not a class this transformers exports
            continue
        return cls.from_pretrained(str(directory), **kwargs)
    if not any(directory.glob("tokenizer*")) and not any(directory.glob("vocab*")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.*) in {directory}")
    return transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)
