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


# ---------------------------------------------------------------------- multilingual translation languages

LANGUAGE_NAMES = {"src_lang": "source language", "tgt_lang": "target language"}


def set_languages(tokenizer, source: str | None, target: str | None, *, targets: bool = False,
                  names: tuple[str, str] = ("--src-lang", "--tgt-lang")) -> int | None:
    """Sets a multilingual translation tokenizer's languages (NLLB-200, M2M100, mBART-50), as
    transformers' recipe does: ``source`` as its ``src_lang`` (the language token it puts on each
    text) and, where it tokenizes ``targets`` too (a training job), ``target`` as its ``tgt_lang``.
    Returns ``target``'s token id, the decoder's forced first token (``forced_bos_token_id``;
    ``None`` without a target).

    Raises:
      ValueError: as :func:`language_tokens`.
    """
    tokens = language_tokens(tokenizer, source, target, targets=targets, names=names)
    if source is not None:
        tokenizer.src_lang = source
    if target is not None and targets:
        tokenizer.tgt_lang = target
    return tokens.get("tgt_lang")


def language_tokens(tokenizer, source: str | None, target: str | None, *, targets: bool = False,
                    names: tuple[str, str] = ("--src-lang", "--tgt-lang")) -> dict[str, int]:
    """``{"src_lang": id, "tgt_lang": id}`` for the languages given: their tokens' ids, checked as
    :func:`set_languages` would set them (a ``target`` on the tokenizer only where it tokenizes
    ``targets``; else it is the decoder's forced first token alone). ``names`` are the source's and
    the target's names in messages (the command's flags, or a request's fields).

    Raises:
      ValueError: a tokenizer without the language asked for, or a code that is not one of its
        language tokens (the name and the code given).
    """
    tokens = {}
    for name, attribute, code in ((names[0], "src_lang", source), (names[1], "tgt_lang", target)):
        if code is None:
            continue
        if (attribute == "src_lang" or targets) and not hasattr(tokenizer, attribute):
            raise ValueError(f"{name} {code!r}: {type(tokenizer).__name__} has no {LANGUAGE_NAMES[attribute]} (a "
                             "multilingual translation tokenizer has: NLLB, M2M100, mBART-50)")
        tokens[attribute] = language_token(tokenizer, code, name)
    return tokens


def language_token(tokenizer, code: str, name: str) -> int:
    """The token id of language ``code`` (M2M100 writes ``fr`` as its token ``__fr__``).

    Raises:
      ValueError: ``code`` is not one of the tokenizer's language tokens (``name`` and ``code`` given).
    """
    if not isinstance(code, str):
        raise ValueError(f"{name} must be a language code (a string), got {code!r}")
    if hasattr(tokenizer, "get_lang_id"):
        try:
            return tokenizer.get_lang_id(code)
        except KeyError:
            pass
    token = tokenizer.convert_tokens_to_ids(code)
    if token is None or token == tokenizer.unk_token_id or code not in tokenizer.all_special_tokens:
        raise ValueError(f"{name} {code!r} is not a language token of {type(tokenizer).__name__} (codes such as "
                         "eng_Latn for NLLB-200, en for M2M100, en_XX for mBART-50)")
    return token
