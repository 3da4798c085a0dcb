"""The data side of training: load text, tokenize it for a task, and batch it in a bounded set of shapes.

    ds = load_text_dataset("peftjax/data/reviews_train.jsonl", split="train")
    ds = tokenize_classification(ds, tokenizer, max_length=128)
    batcher = Batcher(ds, 32, pad_token_id=tokenizer.pad_token_id, seed=0)
    for batch in batcher.batches(epoch=0):           # dict of NumPy arrays, shapes [32, bucket]
        ...

Everything here is host-side NumPy. Tokenization truncates but never pads; the :class:`Batcher` pads
each batch to the smallest of a few bucket lengths (or, with ``packing=True``, lays its sequences
end to end in a few row counts of one length) and fills the last batch up to ``batch_size`` with
weight-0 rows, so a jitted step sees a bounded number of shapes and never recompiles per batch. Batch order depends only on ``(seed, epoch)``, so training resumes at ``(epoch, start)``
onto exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from peftjax.training._shapes import best_buckets, first_fit, fit_packing, round_up

IGNORE_INDEX = -100
# "auto" buckets: multiples of AUTO_MULTIPLE fitted to the lengths of the batches the data makes
# (see Batcher): at most AUTO_MAX_BUCKETS, one more only where it saves AUTO_MIN_SAVING of the
# padded tokens of the first epochs (AUTO_BATCHES batches at least, AUTO_EPOCHS epochs at most)
# and AUTO_MIN_SAVED_BATCHES batches' worth of them an epoch: a shape costs a compilation, 4-4.6 s
# (tracing, lowering and XLA) for the MiniLM step on a 2-core AVX2 CPU, about 33 of its ~130 ms
# steps in the Trainer (2026-12-03; it was 24 steps of 170 ms): 11 batches an epoch of the
# Trainer's default 3 epochs
AUTO_MULTIPLE = 8
AUTO_MAX_BUCKETS = 4
AUTO_MIN_SAVING = 0.03
AUTO_MIN_SAVED_BATCHES = 11
AUTO_BATCHES, AUTO_EPOCHS = 256, 8

# Extension -> `datasets` packaged builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

# Padding value of each per-token column; any other per-token column pads with 0.
_TOKEN_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


# ---------------------------------------------------------------------------------------- loading


def load_text_dataset(source: str | os.PathLike, *, split: str | None = None, data_files=None):
    """Loads a local text dataset, or a named one from the Hugging Face Hub.

    A local file goes through the ``datasets`` builder its extension names (``.json``/``.jsonl`` →
    json, ``.csv`` → csv, ``.parquet`` → parquet, ``.txt`` → text, one ``text`` row per line). A
    local directory loads its files of one such type, with splits inferred from the file names as
    ``datasets`` infers them (``train.jsonl``, ``test.jsonl``, ``*_eval.jsonl``...; otherwise all
    of it is ``train``). Anything else is a Hub name (or a builder name such as ``"json"`` used
    with ``data_files``) and goes to ``datasets.load_dataset(source, split=split, data_files=...)``.

    >>> ds = load_text_dataset("peftjax/data/reviews_train.jsonl", split="train")  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['text', 'label']

    Args:
      source: a file, a directory, or a Hub dataset name.
      split: the split to return (``"train"`` for a single local file); ``None`` returns every
        split as a ``DatasetDict``.
      data_files: for a local directory, the files to use inside it (``str``, list, or
        ``{split: files}``, relative to the directory); otherwise passed to ``load_dataset``.

    Returns:
      A ``datasets.Dataset`` when ``split`` is given, else a ``datasets.DatasetDict``.

    Raises:
      FileNotFoundError: ``source`` looks like a local path (it has a supported extension, starts
        with ``/``, ``.`` or ``~``, or has more than one ``/``) but does not exist.
      ValueError: an unsupported file type; a directory without (or with mixed) supported files;
        a Hub name that cannot be reached (offline, or no network).
    """
    import datasets

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        builder = _builder_for(path)
        files = data_files if data_files is not None else {"train": str(path)}
        return datasets.load_dataset(builder, data_files=files, split=split)
    if path.is_dir():
        builder, files = _directory_files(path, data_files)
        return datasets.load_dataset(builder, data_files=files, split=split)
    if _looks_local(text):
        raise FileNotFoundError(f"dataset file or directory {text!r} does not exist")
    try:
        return datasets.load_dataset(text, split=split, data_files=data_files)
    except ConnectionError as e:  # datasets' own, raised for offline mode and for no network alike
        reason = "offline mode is on (HF_HUB_OFFLINE=1)" if _hub_offline() else "no network"
        raise ValueError(
            f"cannot load dataset {text!r}: it is not a local file or directory, and the Hugging Face "
            f"Hub is unreachable ({reason}); pass a local {'/'.join(BUILDERS)} file or directory"
        ) from e


def _builder_for(path: Path) -> str:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot load {str(path)!r}: unsupported file type {path.suffix or '(none)'!r}; "
            f"supported: {', '.join(BUILDERS)}"
        )
    return builder


def _directory_files(directory: Path, data_files) -> tuple[str, dict[str, list[str]]]:
    """The builder and ``{split: files}`` of a local directory's supported files."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    if data_files is None:
        patterns = get_data_patterns(str(directory))
    elif isinstance(data_files, Mapping):
        patterns = {k: [v] if isinstance(v, str) else list(v) for k, v in data_files.items()}
    else:
        patterns = {"train": [data_files] if isinstance(data_files, str) else list(data_files)}
    resolved = DataFilesDict.from_patterns(patterns, base_path=str(directory))
    files = {
        str(k): [f for f in v if Path(f).suffix.lower() in BUILDERS]
        for k, v in resolved.items()
    }
    files = {k: v for k, v in files.items() if v}
    builders = {BUILDERS[Path(f).suffix.lower()] for v in files.values() for f in v}
    if not builders:
        raise ValueError(
            f"directory {str(directory)!r} holds no dataset files; supported: {', '.join(BUILDERS)}"
        )
    if len(builders) > 1:
        found = sorted({Path(f).suffix.lower() for v in files.values() for f in v})
        raise ValueError(
            f"directory {str(directory)!r} mixes file types {found}; pass data_files= to pick one type"
        )
    return builders.pop(), files


def _looks_local(text: str) -> bool:
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        return True
    return Path(text).suffix.lower() in BUILDERS


def _hub_offline() -> bool:
    try:
        import datasets

        return bool(datasets.config.HF_HUB_OFFLINE)
    except AttributeError:
        return False


# ------------------------------------------------------------------------------------ tokenizing


def tokenize_classification(
    dataset,
    tokenizer,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    max_length: int = 128,
    keep_columns: Sequence[str] = (),
):
    """Tokenizes text (or text pairs) for sequence classification; truncates, never pads.

    >>> ds = tokenize_classification(ds, tokenizer, max_length=64)  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['input_ids', 'token_type_ids', 'attention_mask', 'labels']

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a ``transformers`` tokenizer.
      text_column: the text.
      text_pair_column: the second text of a pair task (NLI, paraphrase), or ``None``.
      label_column: integer (or ``ClassLabel``) labels, floats for regression; ``None`` for
        unlabelled data.
      max_length: rows are truncated to this many tokens, special tokens included.
      keep_columns: columns copied unchanged to the rows each example becomes (each row's
        ``task_ids`` for Poly or multitask prompt tuning, an id to join results on).

    Returns:
      The dataset with only ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
      tokenizer makes them), ``labels`` and ``keep_columns``.

    Raises:
      ValueError: a named column is missing (the message lists the available ones), a kept column
        is one the function makes, or the labels are not numbers.
    """
    _check_positive("max_length", max_length)
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "token_type_ids", "labels"))

    def one(ds):
        columns = [text_column, text_pair_column, label_column, *keep]
        _require_columns(ds, [c for c in columns if c is not None])
        if label_column is not None:
            _check_numeric_labels(ds, label_column)

        def encode(batch):
            pairs = batch[text_pair_column] if text_pair_column is not None else None
            enc = tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            if label_column is not None:
                out["labels"] = batch[label_column]
            return {**out, **{c: batch[c] for c in keep}}

        return _mapped(ds, encode, desc="tokenizing")

    return _per_split(dataset, one)


def tokenize_multiple_choice(
    dataset,
    tokenizer,
    *,
    text_column: str = "context",
    choices_column: str | Sequence[str] = "choices",
    choice_prefix_column: str | None = None,
    label_column: str | None = "label",
    choice_labels_column: str | None = None,
    max_length: int = 128,
    keep_columns: Sequence[str] = (),
):
    """Tokenizes multiple-choice rows for a ``...ForMultipleChoice`` model: each row's text paired
    with each of its choices (``choice_prefix_column``'s text, then a space, before each choice,
    as transformers' ``run_swag.py`` pairs SWAG's ``sent1`` with ``sent2 + " " + ending``), every
    pair truncated (the longer side first) to ``max_length`` tokens, never padded.

    >>> ds = tokenize_multiple_choice(swag, tokenizer, text_column="sent1", choice_prefix_column="sent2",
    ...                               choices_column=["ending0", "ending1", "ending2", "ending3"])  # doctest: +SKIP
    >>> len(ds[0]["input_ids"])  # doctest: +SKIP
    4

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a ``transformers`` tokenizer.
      text_column: the context every choice is paired with (a question, a passage, a sentence).
      choices_column: a column holding each row's choices as a list of strings (HellaSwag's
        ``endings``), or the names of columns holding one choice each (SWAG's ``ending0`` ...).
        Rows may have different numbers of choices (ARC's 3 to 5): the batches pad them.
      choice_prefix_column: text put before each choice (SWAG's ``sent2``), or ``None``.
      label_column: the right choice: its index (integers from 0), its name among the row's
        ``choice_labels_column`` names (ARC's and CommonsenseQA's ``answerKey`` among
        ``choices.label``, after ``dataset.flatten()``), or without that column a letter ``"A"``,
        ``"B"``, ... (RACE's ``answer``); ``None`` for unlabelled data.
      choice_labels_column: a column of each row's choices' names, which string labels are
        looked up in.
      max_length: each pair is truncated to this many tokens, special tokens included.
      keep_columns: columns copied unchanged to each row.

    Returns:
      The dataset with ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer
      makes them), each a token list per choice, ``labels`` and ``keep_columns``: what
      :class:`~peftjax.training.Batcher` makes ``[batch, choices, length]`` batches of.

    Raises:
      ValueError: a named column is missing (the message lists the available ones), a row whose
        choices are not a list of strings or that has none, or a label that names no choice (a
        string label other than a letter needs ``choice_labels_column``: ARC names some rows'
        choices "1", "2", ...).
    """
    _check_positive("max_length", max_length)
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "token_type_ids", "labels"))
    listed = isinstance(choices_column, str)
    choice_columns = [choices_column] if listed else list(choices_column)
    if not choice_columns:
        raise ValueError("choices_column names no column")

    def one(ds):
        _require_columns(ds, [c for c in (text_column, *choice_columns, choice_prefix_column, label_column,
                                          choice_labels_column, *keep) if c is not None])
        def encode(batch, indices):
            rows = (batch[choices_column] if listed else
                    [list(choices) for choices in zip(*(batch[c] for c in choice_columns))])
            firsts, seconds, labels = [], [], []
            for j, (i, choices) in enumerate(zip(indices, rows)):
                if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
                    raise ValueError(f"row {i}: column {choices_column!r} must hold a list of choice strings, "
                                     f"got {choices!r:.80}")
                if not choices:
                    raise ValueError(f"row {i} has no choices")
                if label_column is not None:
                    names = batch[choice_labels_column][j] if choice_labels_column else None
                    labels.append(choice_index(batch[label_column][j], len(choices), names, f"row {i}"))
                prefix = batch[choice_prefix_column][j] if choice_prefix_column else None
                text = batch[text_column][j]
                firsts += [text] * len(choices)
                seconds += [c if prefix is None else f"{prefix} {c}" for c in choices]
            enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length)
            out = {}
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                if k in enc:
                    flat = iter(enc[k])
                    out[k] = [[next(flat) for _ in choices] for choices in rows]
            if label_column is not None:
                out["labels"] = labels
            return {**out, **{c: batch[c] for c in keep}}

        return _mapped(ds, encode, with_indices=True, desc="tokenizing")

    return _per_split(dataset, one)


def choice_index(label, count: int, names: Sequence[str] | None = None, where: str = "a row") -> int:
    """The index of the right choice among ``count`` from a multiple-choice label: an integer index,
    a name among the row's choice ``names``, or without names a letter (``"A"`` is 0).

    >>> choice_index(2, 4), choice_index("C", 4), choice_index("3", 4, ["1", "2", "3", "4"])
    (2, 2, 2)

    Raises:
      ValueError: naming ``where``: a label that is not one of the choices.
    """
    if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
        index = int(label)
    elif isinstance(label, str) and names is not None:
        index = list(names).index(label) if label in list(names) else -1
        if len(names) != count:
            raise ValueError(f"{where}: {len(names)} choice names {list(names)!r} for {count} choices")
    elif isinstance(label, str) and len(label) == 1 and "A" <= label <= "Z":
        index = ord(label) - ord("A")
    else:
        hint = " (a string other than a letter needs the choices' names: choice_labels_column)" \
            if isinstance(label, str) and names is None else ""
        raise ValueError(f"{where}: label {label!r} is not a choice: an index from 0, a letter A, B, ... or one of "
                         f"the row's choice names{hint}")
    if not 0 <= index < count:
        shown = f" among {list(names)!r}" if names is not None else ""
        raise ValueError(f"{where}: label {label!r}{shown} is not one of its {count} choices")
    return index


def tokenize_masked_lm(
    dataset,
    tokenizer,
    *,
    text_column: str = "text",
    max_length: int = 128,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    copies: int = 1,
    seed: int = 0,
    masking: str = "static",
    keep_columns: Sequence[str] = (),
):
    """Tokenizes text for a masked LM and masks it: each text truncated to ``max_length`` tokens,
    then ``copies`` rows of it, each masked anew by :func:`~peftjax.training.mask_tokens` (15% of the
    tokens that are not special, of those 80% the mask token, 10% a random one, 10% kept: each
    chosen token its own label, every other label -100). The masks are drawn here, once (BERT's
    static masking; ``copies`` > 1 is its ``dupe_factor``, several masks of each text), from
    ``seed``, the copy and the row's index: the same arguments, the same rows.

    ``masking="dynamic"`` leaves the rows unmasked and without labels, for a Trainer whose
    ``data_collator`` (:class:`~peftjax.training.DataCollatorForLanguageModeling`) masks each batch
    anew every epoch, as transformers' ``run_mlm.py`` trains.

    >>> ds = tokenize_masked_lm(ds, tokenizer, max_length=64, copies=2)  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['input_ids', 'token_type_ids', 'attention_mask', 'labels']

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a ``transformers`` tokenizer with a mask token.
      text_column: the text.
      max_length: rows are truncated to this many tokens, special tokens included.
      mlm_probability, mask_replace_prob, random_replace_prob: as :func:`mask_tokens`.
      copies: rows made of each text, each with its own masks.
      seed: the masks' seed.
      masking: ``"static"`` (masks drawn here) or ``"dynamic"`` (none: a collator draws them).
      keep_columns: columns copied unchanged to each row.

    Returns:
      The dataset with only ``input_ids`` (masked), ``attention_mask``, ``token_type_ids`` (when the
      tokenizer makes them), ``labels`` and ``keep_columns``, the copies of one text one after another;
      with ``masking="dynamic"``, the same columns unmasked and without ``labels``.

    Raises:
      ValueError: a named column is missing, a kept column is one the function makes, the tokenizer
        has no mask token, ``copies`` with dynamic masking, or an argument is out of range (see
        :func:`mask_tokens`).
    """
    from peftjax.training._masking import mask_tokens

    _check_positive("max_length", max_length)
    _check_positive("copies", copies)
    if masking not in ("static", "dynamic"):
        raise ValueError(f"masking={masking!r}: expected 'static' or 'dynamic'")
    if masking == "dynamic" and copies != 1:
        raise ValueError(f"copies={copies} with masking='dynamic': each epoch masks every row anew already")
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "token_type_ids", "labels"))
    if getattr(tokenizer, "mask_token_id", None) is None:
        raise ValueError(f"{type(tokenizer).__name__} has no mask token: a masked LM's inputs need one")
    vocab_size = len(tokenizer)

    def one(ds):
        _require_columns(ds, [text_column, *keep])

        def encode(batch, indices):
            enc = tokenizer(batch[text_column], truncation=True, max_length=max_length,
                            return_special_tokens_mask=True)
            copied = [k for k in ("attention_mask", "token_type_ids") if k in enc]  # the same in every copy
            if masking == "dynamic":
                return {"input_ids": enc["input_ids"], **{k: enc[k] for k in copied}, **{c: batch[c] for c in keep}}
            out = {k: [] for k in ("input_ids", *copied, "labels", *keep)}
            for row, index in enumerate(indices):
                ids = np.asarray([enc["input_ids"][row]])
                for copy in range(copies):
                    masked, labels = mask_tokens(
                        ids, np.random.default_rng([seed, copy, index]), mask_token_id=tokenizer.mask_token_id,
                        vocab_size=vocab_size, special_tokens_mask=np.asarray([enc["special_tokens_mask"][row]]),
                        mlm_probability=mlm_probability, mask_replace_prob=mask_replace_prob,
                        random_replace_prob=random_replace_prob)
                    out["input_ids"].append(masked[0].tolist())
                    out["labels"].append(labels[0].tolist())
                    for k in copied:
                        out[k].append(enc[k][row])
                    for c in keep:
                        out[c].append(batch[c][row])
            return out

        return _mapped(ds, encode, with_indices=True, desc="masking")

    return _per_split(dataset, one)


def tokenize_token_classification(
    dataset,
    tokenizer,
    *,
    tokens_column: str = "tokens",
    tags_column: str = "ner_tags",
    max_length: int = 128,
    label_all_tokens: bool = False,
    keep_columns: Sequence[str] = (),
):
    """Tokenizes pre-split words for token classification (named entities, tags), one label per
    token: a word's label on its first sub-token, ``-100`` on special tokens and on a word's later
    sub-tokens (their label too with ``label_all_tokens``), as transformers' token-classification
    recipe aligns them; truncates, never pads.

    >>> ds = tokenize_token_classification(conll["train"], tokenizer)  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['input_ids', 'attention_mask', 'labels']

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a fast ``transformers`` tokenizer (its ``word_ids`` map tokens to words); a byte-level
        BPE one (RoBERTa's, GPT-2's) loaded with ``add_prefix_space=True``, so that each word is
        tokenized as in running text.
      tokens_column: each row's words (a list of strings).
      tags_column: each row's word labels (a list of integer class ids, one per word).
      max_length: rows are truncated to this many tokens, special tokens included.
      label_all_tokens: label every sub-token of a word, not only its first.
      keep_columns: columns copied unchanged to the rows each example becomes (each row's
        ``task_ids`` for Poly or multitask prompt tuning, an id to join results on).

    Returns:
      The dataset with only ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
      tokenizer makes them), ``labels`` and ``keep_columns``.

    Raises:
      ValueError: a named column is missing or a kept one is made here, the tokenizer is not a fast
        one or is byte-level without ``add_prefix_space``, or a row's tags are not one integer per
        word (the row is named).
    """
    _check_positive("max_length", max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenize_token_classification needs a fast tokenizer (its word_ids align word labels "
                         f"to tokens); got {type(tokenizer).__name__}")
    if words_lose_their_space(tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} is a byte-level BPE tokenizer loaded without "
                         "add_prefix_space=True: it would read every word as the start of a text, with other "
                         "tokens than in running text; load it with add_prefix_space=True (as transformers' "
                         "token-classification recipe does)")
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "token_type_ids", "labels"))

    def one(ds):
        _require_columns(ds, [tokens_column, tags_column, *keep])

        def encode(batch, indices):
            enc = tokenizer(batch[tokens_column], is_split_into_words=True, truncation=True, max_length=max_length)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            out["labels"] = []
            for row, (words, tags) in enumerate(zip(batch[tokens_column], batch[tags_column])):
                if len(tags) != len(words) or not all(isinstance(t, (int, np.integer)) for t in tags):
                    raise ValueError(f"row {indices[row]}: {tags_column!r} must hold one integer label per word "
                                     f"({len(words)} words), got {tags!r}")
                labels, previous = [], None
                for word in enc.word_ids(row):
                    first = word is not None and word != previous
                    labels.append(int(tags[word]) if word is not None and (first or label_all_tokens) else -100)
                    previous = word
                out["labels"].append(labels)
            return {**out, **{c: batch[c] for c in keep}}

        return _mapped(ds, encode, with_indices=True, desc="tokenizing")

    return _per_split(dataset, one)


def tokenize_question_answering(
    dataset,
    tokenizer,
    *,
    question_column: str = "question",
    context_column: str = "context",
    answers_column: str = "answers",
    max_length: int = 384,
    stride: int = 128,
    keep_columns: Sequence[str] = (),
):
    """Tokenizes SQuAD-style rows for extractive question answering: each question with its
    context (truncating only the context), a long context as several overlapping windows (``stride``
    tokens shared), and each window's answer as token indices, as transformers' question-answering
    recipe labels them: the first and last token of the answer's characters, or ``[0, 0]`` (the
    first token) in a window that does not hold the whole answer. Never pads. Each window keeps
    its row's index and its context tokens' character spans, from which :func:`answer_questions`
    takes each question's answer out of the model's logits (the Trainer reads neither).

    >>> ds = tokenize_question_answering(squad["train"], tokenizer)  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['input_ids', 'token_type_ids', 'attention_mask', 'start_positions', 'end_positions', 'example_index',
     'context_offsets']

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a fast ``transformers`` tokenizer (its offsets map tokens to characters).
      question_column: each row's question.
      context_column: each row's context, the text the answer is taken from.
      answers_column: SQuAD's ``{"text": [...], "answer_start": [...]}`` per row; the first answer
        labels the row; none (empty lists) labels every window ``[0, 0]``.
      max_length: tokens per window, the question and special tokens included.
      stride: tokens a window shares with the one before it.
      keep_columns: columns copied unchanged to every window of their row (each row's
        ``task_ids`` for Poly or multitask prompt tuning).

    Returns:
      The windows (more rows than the dataset where contexts overflow): ``input_ids``,
      ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them), ``start_positions``,
      ``end_positions``, ``example_index`` (the window's row in its split) and ``context_offsets``
      (each token's ``[start, end)`` characters in the context; ``[-1, -1]`` for the question's
      and the special tokens), and ``keep_columns``.

    Raises:
      ValueError: a named column is missing or a kept one is made here, the tokenizer is not a fast
        one, ``stride`` leaves no room, or a row's answer text is not the context's characters at
        ``answer_start`` (the row is named).
    """
    _check_positive("max_length", max_length)
    if not isinstance(stride, int) or stride < 0:
        raise ValueError(f"stride must be an int >= 0, got {stride!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenize_question_answering needs a fast tokenizer (its offsets find the answer's "
                         f"tokens); got {type(tokenizer).__name__}")
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "token_type_ids", "start_positions",
                                        "end_positions", "example_index", "context_offsets"))

    def one(ds):
        _require_columns(ds, [question_column, context_column, answers_column, *keep])

        def encode(batch, indices):
            questions = [q.lstrip() for q in batch[question_column]]  # leading spaces only cost tokens
            check_context_room(tokenizer, questions, max_length, stride, indices,
                               f"tokenize_question_answering (max_length={max_length}, stride={stride})")
            enc = tokenizer(questions, batch[context_column], truncation="only_second", max_length=max_length,
                            stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
            out["start_positions"], out["end_positions"] = [], []
            out["example_index"], out["context_offsets"] = [], []
            out.update({c: [batch[c][row] for row in enc["overflow_to_sample_mapping"]] for c in keep})
            for window, (row, offsets) in enumerate(zip(enc["overflow_to_sample_mapping"], enc["offset_mapping"])):
                out["start_positions"].append(0)
                out["end_positions"].append(0)
                out["example_index"].append(indices[row])
                tokens = [i for i, s in enumerate(enc.sequence_ids(window)) if s == 1]  # the context's
                spans = [[-1, -1]] * len(offsets)
                for i in tokens:
                    spans[i] = list(offsets[i])
                out["context_offsets"].append(spans)
                answers, context = batch[answers_column][row], batch[context_column][row]
                if not answers["answer_start"]:
                    continue
                first, text = int(answers["answer_start"][0]), answers["text"][0]
                if context[first:first + len(text)] != text:
                    raise ValueError(f"row {indices[row]}: answer {text!r} is not the context's text at answer_start "
                                     f"{first} ({context[first:first + len(text)]!r})")
                last = first + len(text)
                if not tokens or offsets[tokens[0]][0] > first or offsets[tokens[-1]][1] < last:
                    continue  # the answer is not wholly in this window
                out["start_positions"][-1] = next(i for i in tokens if offsets[i][1] > first)
                out["end_positions"][-1] = next(i for i in reversed(tokens) if offsets[i][0] < last)
            return out

        return _mapped(ds, encode, with_indices=True, desc="tokenizing")

    return _per_split(dataset, one)


def check_context_room(tokenizer, questions: Sequence[str], max_length: int, stride: int,
                       rows: Sequence[int], where: str) -> None:
    """Raises ``ValueError`` naming the first question (by its row) that leaves a window of
    ``max_length`` tokens no more context tokens than ``stride``: a window would not move on (the
    fast tokenizer panics there, past Python's ``Exception``)."""
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    for row, ids in zip(rows, tokenizer(list(questions), add_special_tokens=False)["input_ids"]):
        room = max_length - specials - len(ids)
        if room <= stride:
            raise ValueError(f"{where}: row {row}'s question takes {len(ids)} tokens, leaving {max(room, 0)} of "
                             f"{max_length} for the context; the context needs more than stride={stride}: raise "
                             "max_length or lower stride")


def tokenize_causal_lm(
    dataset,
    tokenizer,
    *,
    text_column: str = "text",
    max_length: int = 512,
    packing: bool = True,
    keep_columns: Sequence[str] = (),
):
    """Tokenizes documents for next-token prediction; ``labels`` equal ``input_ids``.

    Every document is tokenized as the tokenizer does by default (a Llama tokenizer adds BOS) and
    followed by ``tokenizer.eos_token_id`` when the tokenizer has one. With ``packing`` this token
    stream is concatenated across documents and cut into rows of exactly ``max_length`` tokens,
    dropping the remainder, so no batch carries padding. Without it, each document is one row,
    truncated to ``max_length``. The labels are not shifted: the loss shifts them.

    >>> packed = tokenize_causal_lm(ds, tokenizer, max_length=256)  # doctest: +SKIP
    >>> {len(ids) for ids in packed["input_ids"]}  # doctest: +SKIP
    {256}

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a ``transformers`` tokenizer.
      text_column: the documents.
      max_length: the block length with packing, the truncation length without.
      packing: concatenate and cut into full blocks, or keep one row per document.
      keep_columns: without packing, columns copied unchanged to each document's row (its
        ``task_ids`` for Poly or multitask prompt tuning); a packed block has no one row's value.

    Returns:
      The dataset with ``input_ids``, ``attention_mask``, ``labels`` and ``keep_columns``.

    Raises:
      ValueError: ``text_column`` or a kept column is missing, a column is kept with packing, or
        packing leaves no full block.
    """
    import datasets

    _check_positive("max_length", max_length)
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "labels"))
    if keep and packing:
        raise ValueError(f"keep_columns={keep}: a packed block joins several documents, so it has no one "
                         "document's value; pass packing=False (one row per document)")
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch[text_column], verbose=False)["input_ids"]
        if eos is not None:
            ids = [row if row and row[-1] == eos else [*row, eos] for row in ids]
        if not packing:
            ids = [row[:max_length] for row in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "labels": ids}

    def one(ds):
        _require_columns(ds, [text_column, *keep])
        if not packing:
            return _mapped(ds, lambda batch: {**encode(batch), **{c: batch[c] for c in keep}}, desc="tokenizing")
        tokens = _mapped(ds, lambda batch: {"input_ids": encode(batch)["input_ids"]}, desc="tokenizing")
        stream = _flat_values(tokens.with_format("arrow")[:].column("input_ids")).astype(np.int32)
        blocks = len(stream) // max_length
        if blocks == 0:
            raise ValueError(
                f"packing {len(stream)} tokens into blocks of max_length={max_length} leaves no full "
                "block; lower max_length or pass packing=False"
            )
        ids = stream[: blocks * max_length].reshape(blocks, max_length)
        return datasets.Dataset.from_dict(
            {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
        )

    return _per_split(dataset, one)


def tokenize_instructions(
    dataset,
    tokenizer,
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    max_length: int = 512,
    template: str = "{prompt}\n",
    keep_columns: Sequence[str] = (),
):
    """Tokenizes prompt/response pairs so that only the response is learned.

    A row is ``[leading special tokens] + template(prompt) + response + [eos]``; its ``labels`` are
    ``-100`` over the special tokens and the prompt, and the token ids over the response and the
    eos. Tokenizers without an eos token end the row with their trailing special tokens instead
    (BERT's ``[SEP]``). Truncation cuts the end, keeping the start of the prompt; a row whose
    response is cut away entirely is dropped, with one warning that counts them.

    >>> ds = tokenize_instructions(ds, tokenizer, template="### Question: {prompt}\\n### Answer: ")  # doctest: +SKIP

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a ``transformers`` tokenizer.
      prompt_column: the instruction.
      response_column: the answer to learn.
      max_length: rows are truncated to this many tokens.
      template: a ``str.format`` template with a ``{prompt}`` field.
      keep_columns: columns copied unchanged to the rows each example becomes (each row's
        ``task_ids`` for Poly or multitask prompt tuning, an id to join results on).

    Returns:
      The dataset with ``input_ids``, ``attention_mask``, ``labels`` and ``keep_columns``.

    Raises:
      ValueError: a named column is missing or a kept one is made here, or ``template`` has no
        ``{prompt}`` field.
    """
    _check_positive("max_length", max_length)
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "labels"))
    if "{prompt}" not in template:
        raise ValueError(f"template {template!r} has no {{prompt}} field")
    prefix, suffix = _special_affixes(tokenizer)
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else suffix

    def encode(batch):
        prompts = [template.format(prompt=p) for p in batch[prompt_column]]
        prompt_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        response_ids = tokenizer(batch[response_column], add_special_tokens=False, verbose=False)["input_ids"]
        out = {"input_ids": [], "attention_mask": [], "labels": [], **{c: [] for c in keep}}
        for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            head = [*prefix, *p]
            ids = [*head, *r, *end][:max_length]
            labels = ([IGNORE_INDEX] * len(head) + [*r, *end])[:max_length]
            if len(ids) <= len(head):  # nothing left to learn
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            for c in keep:
                out[c].append(batch[c][row])
        return out

    def one(ds):
        _require_columns(ds, [prompt_column, response_column, *keep])
        result = _mapped(ds, encode, desc="tokenizing")
        dropped = len(ds) - len(result)
        if dropped:
            warnings.warn(
                f"tokenize_instructions dropped {dropped} of {len(ds)} rows whose prompt fills "
                f"max_length={max_length}, leaving no response tokens",
                stacklevel=3,
            )
        return result

    return _per_split(dataset, one)


def tokenize_seq2seq(
    dataset,
    tokenizer,
    *,
    source_column: str = "source",
    target_column: str = "target",
    max_length: int = 512,
    max_target_length: int = 128,
    prefix: str = "",
    keep_columns: Sequence[str] = (),
):
    """Tokenizes source/target text pairs for an encoder-decoder (``SEQ_2_SEQ_LM``), as HF's examples do.

    The source (after ``prefix``, e.g. ``"summarize: "``) becomes ``input_ids`` and
    ``attention_mask``; the target, tokenized with the tokenizer's default special tokens (T5's
    trailing ``</s>``), becomes ``labels``, a token list of its own length. The model derives its
    decoder input from the labels (``shift_right``); the :class:`Batcher` pads both sides to their
    own buckets when given ``target_columns=("labels",)``, as the ``Trainer`` does for such models.
    Truncation cuts the end of each side.

    >>> ds = tokenize_seq2seq(ds, tokenizer, prefix="translate English to German: ")  # doctest: +SKIP
    >>> ds.column_names  # doctest: +SKIP
    ['input_ids', 'attention_mask', 'labels']

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a ``transformers`` tokenizer.
      source_column: the encoder's text.
      target_column: the text the decoder learns to produce.
      max_length: sources are truncated to this many tokens.
      max_target_length: targets are truncated to this many tokens.
      prefix: prepended to every source (T5's task prefixes).
      keep_columns: columns copied unchanged to the rows each example becomes (each row's
        ``task_ids`` for Poly or multitask prompt tuning, an id to join results on).

    Returns:
      The dataset with ``input_ids``, ``attention_mask``, ``labels`` and ``keep_columns``.

    Raises:
      ValueError: a named column is missing or a kept one is made here, or a length is not a
        positive int.
    """
    _check_positive("max_length", max_length)
    _check_positive("max_target_length", max_target_length)
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "labels"))

    def encode(batch):
        enc = tokenizer([prefix + s for s in batch[source_column]], truncation=True, max_length=max_length,
                        verbose=False)
        targets = tokenizer(text_target=list(batch[target_column]), truncation=True, max_length=max_target_length,
                            verbose=False)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": targets["input_ids"], **{c: batch[c] for c in keep}}

    def one(ds):
        _require_columns(ds, [source_column, target_column, *keep])
        return _mapped(ds, encode, desc="tokenizing")

    return _per_split(dataset, one)


def tokenizer_digest(tokenizer) -> str:
    """A digest of what decides how ``tokenizer`` tokenizes: a fast tokenizer's whole definition
    (``backend_tokenizer.to_str()``: vocabulary, merges, normalizer, pre-tokenizer, post-processor,
    added tokens; not the truncation and padding the last call left set), its class, special
    tokens, chat template, settings and a translation tokenizer's languages, in milliseconds (a
    definition seen before is not parsed again); a slow one's as ``datasets`` hashes it (pickled)."""
    import hashlib
    import json

    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    text = backend.to_str()
    key = hashlib.sha256(text.encode()).digest()  # the whole definition, as it stands now
    definition = _DEFINITION_DIGESTS.pop(key, None)
    if definition is None:
        # without the truncation and padding the last call left set: each call sets its own
        parsed = {k: v for k, v in json.loads(text).items() if k not in ("truncation", "padding")}
        definition = hashlib.sha256(json.dumps(parsed, sort_keys=True).encode()).hexdigest()
    _DEFINITION_DIGESTS[key] = definition  # the most recent last
    while len(_DEFINITION_DIGESTS) > 16:
        del _DEFINITION_DIGESTS[next(iter(_DEFINITION_DIGESTS))]
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                if isinstance(v, (str, int, float, bool, type(None), list, tuple))}
    # a translation tokenizer's languages as set now (its targets' language is in no definition until
    # it tokenizes a target)
    languages = getattr(tokenizer, "src_lang", None), getattr(tokenizer, "tgt_lang", None)
    extra = (type(tokenizer).__qualname__, getattr(tokenizer, "special_tokens_map", None),
             getattr(tokenizer, "chat_template", None), getattr(tokenizer, "add_prefix_space", None),
             sorted(settings.items(), key=lambda kv: kv[0]), *(languages if any(languages) else ()))
    digest = hashlib.sha256(definition.encode())
    digest.update(repr(extra).encode())
    return digest.hexdigest()


# sha256 of a backend's ``to_str()`` -> the digest of its definition without truncation and padding
# (sorting and dumping a 30k vocabulary took 75 ms a call; the same text gives the same digest)
_DEFINITION_DIGESTS: dict[bytes, str] = {}


def _code_digest(fn, digest, seen: set) -> None:
    """Feeds ``digest`` with a function's code (nested functions and code objects included) and
    the values it closes over, a tokenizer by :func:`tokenizer_digest`."""
    from datasets.fingerprint import Hasher

    if id(fn) in seen:
        return
    seen.add(id(fn))
    code = fn.__code__

    def feed_code(c) -> None:
        digest.update(c.co_code)
        digest.update(repr(c.co_names).encode())
        for const in c.co_consts:
            feed_code(const) if hasattr(const, "co_code") else digest.update(repr(const).encode())

    feed_code(code)
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if hasattr(value, "__code__"):
            _code_digest(value, digest, seen)
        elif hasattr(value, "backend_tokenizer") or type(value).__name__.endswith("Tokenizer"):
            digest.update(tokenizer_digest(value).encode())
        else:
            digest.update(Hasher.hash(value).encode())


def _mapped(ds, fn, **kwargs):
    """``ds.map(fn, batched=True)``, its columns replaced by ``fn``'s, under a fingerprint made here
    from the dataset's, ``fn``'s code, the values it closes over (the tokenizer by
    :func:`tokenizer_digest`), the arguments and peftjax's version. ``datasets`` would hash the
    same by pickling the tokenizer, which took 0.3 s a call for MiniLM's (seconds for a 128k
    vocabulary) against a few milliseconds; the fingerprint still changes with anything that
    changes the rows, so a cached result is reused only where it is the same."""
    import hashlib

    from peftjax._version import __version__

    digest = hashlib.sha256(f"{ds._fingerprint}\0{__version__}\0{sorted(kwargs.items())!r}".encode())
    _code_digest(fn, digest, set())
    return ds.map(fn, batched=True, remove_columns=ds.column_names, new_fingerprint=digest.hexdigest()[:32], **kwargs)


def _per_split(dataset, fn):
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({name: fn(split) for name, split in dataset.items()})
    return fn(dataset)


def _require_columns(ds, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"dataset has no column {', '.join(map(repr, missing))}; available: {ds.column_names}"
        )


def _kept_columns(keep_columns, made: tuple[str, ...]) -> list[str]:
    """``keep_columns`` as a list (one name may be given as a string).

    Raises:
      ValueError: a kept column is one the tokenizing function makes.
    """
    keep = [keep_columns] if isinstance(keep_columns, str) else list(keep_columns)
    clash = [c for c in keep if c in made]
    if clash:
        raise ValueError(f"keep_columns {clash}: the tokenized rows make their own {', '.join(clash)}; rename the "
                         "column first (dataset.rename_column)")
    return keep


def _check_numeric_labels(ds, column: str) -> None:
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return
    dtype = getattr(feature, "dtype", None)
    if dtype is None or not (dtype == "bool" or dtype.startswith(("int", "uint", "float"))):
        raise ValueError(
            f"label column {column!r} holds {feature}, not numbers; encode it first, e.g. with "
            f"dataset.class_encode_column({column!r})"
        )


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text by default."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    return [], []


def words_lose_their_space(tokenizer) -> bool:
    """Whether a fast tokenizer is byte-level BPE (GPT-2's, RoBERTa's) without ``add_prefix_space``:
    given pre-split words it tokenizes each as if it began a text, without the leading space it has
    in running text. WordPiece and SentencePiece tokenizers mark word starts themselves."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    stack = [json.loads(backend.to_str()).get("pre_tokenizer")]
    while stack:
        part = stack.pop()
        if isinstance(part, dict):
            if part.get("type") == "ByteLevel" and not part.get("add_prefix_space", False):
                return True
            stack.extend(part.get("pretokenizers") or [])
    return False


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _flat_values(column) -> np.ndarray:
    """The concatenated values of an Arrow list column."""
    import pyarrow.compute as pc

    return np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False))


# ---------------------------------------------------------------------------------------- batching


class Batcher:
    """Deterministic, resumable batches padded to a bounded set of shapes.

    Each epoch visits the rows in the order of ``np.random.default_rng([seed, epoch]).permutation``
    (or in order without ``shuffle``). A batch is padded to the smallest bucket length that holds
    its longest row: ``input_ids`` with ``pad_token_id``, ``attention_mask`` and ``token_type_ids``
    with 0, per-token ``labels`` with -100.

    The default buckets, ``"auto"``, are fitted to the batches this data makes: multiples of 8
    (or of ``pad_to_multiple_of``), the largest the longest row rounded up, and below it at most
    three more, chosen to minimise the padded tokens of the batches of the first epochs (simulated
    from the same order; at least 256 batches, at most 8 epochs); a bucket is added only where it
    saves 3% of those tokens and eleven batches' worth of them an epoch (a compilation costs about
    33 small steps on a CPU). Each bucket is a shape a jitted step compiles for, so a small
    dataset gets few; the fit pads short-text data less than a fixed ladder (the MiniLM reviews:
    24 and 48, 1.91 padded tokens per real token, against 2.09 with the former 32 and 48).

    Unless ``drop_last``, the last batch is filled up to
    ``batch_size`` with all-padding rows, so every batch is ``[batch_size, bucket]`` and a jitted
    step compiles at most ``len(buckets)`` times. Every batch carries ``sample_weight`` (float32,
    ``[batch_size]``): 1 for real rows, 0 for filler rows, which carry label 0 (per-row labels) or
    -100 (per-token labels).

    Columns whose rows have ``input_ids``' length are per-token and padded; other columns are per
    row (classification labels, regression targets, fixed-length multi-label vectors) and are
    stacked untouched. Without an ``attention_mask`` column one is made (1 on every real token).

    ``packing=True`` lays each batch's sequences end to end into rows of ``pack_length`` tokens
    (longest first, each into the first row with room; a sequence is never split), so short texts
    are not padded to the longest of their batch. Every per-token column is then ``[rows,
    pack_length]``, beside ``segment_ids`` (``k + 1`` on the tokens of the batch's k-th sequence, 0
    on padding) and ``segment_starts`` (``[batch_size]``: the flat index ``row * pack_length +
    column`` of each sequence's first token, 0 for filler sequences); per-row columns and
    ``sample_weight`` stay ``[batch_size]``. Padding a row already ends with (its last tokens
    with ``attention_mask`` 0, as ``padding="max_length"`` tokenization leaves them) is dropped
    first. ``pack_length`` and the row counts (``row_buckets``)
    are fitted as the ``"auto"`` buckets are, over the same simulated batches: among lengths of
    1 to 2 times the longest sequence, the one that pads least, each shape past the first charged
    what a bucket must save (a later batch that needs more rows than the fitted counts gets
    ``batch_size`` rows, which always suffice). A model that takes
    ``segment_ids`` (peftjax's BERT) attends within each sequence only and restarts its positions
    at each one, so its per-sequence outputs are those of the unpacked batch.

    Multiple choice: where ``input_ids`` holds a list of token lists per row (each row's choices,
    as :func:`tokenize_multiple_choice` makes them), every per-token column does too, and a batch's
    per-token columns are ``[batch_size, C, bucket]``, ``C`` the most choices any row has (a row
    with fewer gets empty choices, all padding, which the ``...ForMultipleChoice`` models leave
    out), a row's length its longest choice's; per-row columns (``labels``: the right choice's
    index) stay ``[batch_size]``. Not with packing or target columns.

    ``target_columns`` are token lists of their own length: the decoder side of an
    encoder-decoder (``labels`` from :func:`tokenize_seq2seq`). Each batch pads them to the
    smallest bucket that holds their longest row in the batch, independently of ``input_ids``
    (``labels`` with -100, others with 0; always on the right), so a batch is
    ``[batch_size, source bucket]`` plus ``[batch_size, target bucket]``.

    >>> b = Batcher({"input_ids": [[5, 6, 7], [8]], "labels": [1, 0]}, 4, buckets=(4, 8))
    >>> b.num_batches
    1
    >>> Batcher({"input_ids": [[1] * 20] * 300 + [[1] * 43] * 100, "labels": [1] * 400}, 4, shuffle=False).buckets
    (24, 48)
    >>> batch = next(b.batches(0))
    >>> {k: v.shape for k, v in batch.items()}
    {'input_ids': (4, 4), 'attention_mask': (4, 4), 'labels': (4,), 'sample_weight': (4,)}

    Args:
      dataset_or_columns: a ``datasets.Dataset``, or a mapping of column name to per-row values
        (lists, or NumPy arrays), holding numeric columns only, ``input_ids`` among them.
      batch_size: rows per batch.
      buckets: the allowed padded lengths, used as given; ``"auto"`` (the default) fits them to
        the data as described above; ``None`` pads each batch to its longest row (rounded up to
        ``pad_to_multiple_of``), so shapes vary.
      pad_token_id: the ``input_ids`` padding (the tokenizer's ``pad_token_id``).
      shuffle: permute the rows each epoch.
      seed: with the epoch, determines the order.
      drop_last: drop the last partial batch instead of filling it.
      pad_to_multiple_of: rounds every bucket (or, without buckets, every length) up to a multiple
        of this.
      padding_side: ``"right"``, or ``"left"`` for generation prompts.
      target_columns: columns of token lists padded on their own (see above).
      packing: pack each batch's sequences into shared rows (see above); needs the default
        ``buckets``, right padding, no target columns and no per-token ``labels`` unless
        ``next_token_labels``.
      next_token_labels: the per-token ``labels`` are a causal LM's next-token targets (the loss
        scores label ``t + 1`` from position ``t``): packed, each sequence's first label becomes
        -100, so no sequence is scored on predicting the next one's first token and the scored
        tokens are the unpacked batch's. With a model that takes ``segment_ids``, the packed
        batch's loss is the unpacked one's.
      collate: called on each padded batch as ``collate(batch, rng)``, ``rng`` a
        ``numpy.random.Generator`` seeded by ``[seed, epoch, the batch's index in its epoch]``;
        what it returns is the batch (a masked LM's masks drawn anew each epoch:
        :class:`~peftjax.training.DataCollatorForLanguageModeling`). The same batch, the same
        draw, so a resumed run sees the batches the stopped one would have.

    Raises:
      ValueError: a row longer than the largest bucket (named by index and length), per-token
        columns of unequal lengths, missing ``input_ids``, columns of unequal row counts, a target
        column that is missing or not token lists, or a bad argument.
      TypeError: a non-numeric column (such as leftover ``text``).
    """

    def __init__(
        self,
        dataset_or_columns,
        batch_size: int,
        *,
        buckets: Sequence[int] | str | None = "auto",
        pad_token_id: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
        target_columns: Sequence[str] = (),
        packing: bool = False,
        next_token_labels: bool = False,
        collate: Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, np.ndarray]] | None = None,
    ):
        _check_positive("batch_size", batch_size)
        if collate is not None and not callable(collate):
            raise TypeError(f"collate must be callable as collate(batch, rng), got {type(collate).__name__}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None:
            _check_positive("pad_to_multiple_of", pad_to_multiple_of)
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        auto = isinstance(buckets, str)
        if auto and buckets != "auto":
            raise ValueError(f"buckets must be 'auto', None or a sequence of positive ints, got {buckets!r}")
        if buckets is not None and not auto:
            if not buckets or any(not isinstance(b, (int, np.integer)) or b <= 0 for b in buckets):
                raise ValueError(f"buckets must be positive ints, got {buckets!r}")
            buckets = tuple(sorted({round_up(int(b), pad_to_multiple_of) for b in buckets}))
        self.batch_size = batch_size
        self.buckets = buckets
        self.pad_token_id = int(pad_token_id)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.collate = collate

        columns = _raw_columns(dataset_or_columns)
        self._targets = _target_columns(columns, target_columns)
        # a multiple-choice row's choices: its nested token lists, flattened to one row per choice
        self.choices, columns = _choice_columns(columns)
        if self.choices and (packing or target_columns):
            raise ValueError("Batcher: multiple-choice rows (input_ids holding a token list per choice) take "
                             "neither packing nor target_columns")
        self._tokens, self._rows, self.num_rows = _split_columns(columns, self.choices or 1)
        bad = {k: len(v[1]) - 1 for k, v in self._targets.items() if len(v[1]) - 1 != self.num_rows}
        if bad:
            raise ValueError(f"target columns {bad} do not have input_ids' {self.num_rows} rows")
        self._lengths = np.diff(self._tokens["input_ids"][1])
        if self.choices:  # a row's length is its longest choice's
            self._lengths = self._lengths.reshape(self.num_rows, self.choices).max(axis=1, initial=0)
        self._target_lengths = {k: np.diff(v[1]) for k, v in self._targets.items()}
        self.packing = bool(packing)
        self.next_token_labels = bool(next_token_labels)
        self.pack_length: int | None = None
        self.row_buckets: tuple[int, ...] | None = None
        if self.packing:
            self._lengths = self._unpadded_lengths(columns)
            self._check_packable(buckets, target_columns)
            self.buckets = None
            if self.num_rows:
                self.pack_length, self.row_buckets = self._fit_packing(pad_to_multiple_of or AUTO_MULTIPLE)
            return
        if auto:  # targets take their own bucket from the same set: it is fitted to both
            self.buckets = buckets = self._fit_buckets(pad_to_multiple_of or AUTO_MULTIPLE) if self.num_rows else None
        if buckets is not None and self.num_rows:
            for name, lengths in {"input_ids": self._lengths, **self._target_lengths}.items():
                _check_fits(name, lengths, buckets[-1])

    def check_token_ids(self, vocab_size: int, name: str) -> None:
        """Raises ``ValueError`` naming the first row with an ``input_ids`` token (or a target
        column's, -100 aside) outside ``[0, vocab_size)``: a jitted embedding lookup would clamp it
        or give NaN, never fail. ``name`` names the data in the message."""
        for column, (values, offsets) in {"input_ids": self._tokens["input_ids"], **self._targets}.items():
            bad = (values < 0) | (values >= vocab_size)
            if column != "input_ids":
                bad &= values != -100
            if bad.any():
                at = int(np.argmax(bad))
                row = int(np.searchsorted(offsets, at, side="right")) - 1
                raise ValueError(f"{name}: row {row} has the {column} token {int(values[at])}, outside the model's "
                                 f"vocabulary [0, {vocab_size}): data tokenized for another model, or a tokenizer "
                                 "with tokens added that the model's embedding has no rows for")

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_rows // self.batch_size
        return math.ceil(self.num_rows / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def order(self, epoch: int) -> np.ndarray:
        """The row indices of ``epoch`` in visiting order."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)

    def batches(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The batches of ``epoch`` from batch index ``start`` on (``start`` resumes mid-epoch)."""
        order = self.order(epoch)
        self._check_start(start)
        return self._iterate(order, int(epoch), int(start))

    def _iterate(self, order: np.ndarray, epoch: int, start: int) -> Iterator[dict[str, np.ndarray]]:
        for position, index in enumerate(self._batch_indices(order)[start:], start):
            batch = self._batch(index)
            if self.collate is not None:
                batch = self.collate(batch, np.random.default_rng([self.seed, epoch, position]))
            yield batch

    def batch_lengths(self, epoch: int, start: int = 0) -> np.ndarray:
        """The padded length of each batch of ``epoch`` from ``start`` on, without building them:
        ``[batches]``, or with target columns ``[batches, 1 + targets]`` (inputs first, then each
        target column in order)."""
        order = self.order(epoch)
        self._check_start(start)
        columns = [self._lengths, *self._target_lengths.values()]
        out = np.array([[self._length_for(int(m)) for m in self._batch_maxima(lengths, order)[start:]]
                        for lengths in columns], dtype=np.int64).T
        return out[:, 0] if not self._targets else out

    def batch_shapes(self, epoch: int, start: int = 0) -> list[tuple[int, ...]]:
        """Each batch's shape key from ``start`` on, without building the batches: equal keys,
        equal array shapes (one compiled step). Packed: ``(rows, pack_length)``; otherwise the
        padded length, then each target column's."""
        if not self.packing:
            lengths = self.batch_lengths(epoch, start)
            return [tuple(np.atleast_1d(x).tolist()) for x in lengths]
        order = self.order(epoch)
        self._check_start(start)
        return [(self._rows_for(first_fit(self._lengths[index], self.pack_length)[1]), self.pack_length)
                for index in self._batch_indices(order)[start:]]

    def _batch_indices(self, order: np.ndarray) -> list[np.ndarray]:
        return [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.num_batches)]

    def _check_packable(self, buckets, target_columns) -> None:
        problems = []
        if buckets != "auto":
            problems.append(f"buckets={buckets!r} (packing fits its own pack length and row counts)")
        if self.padding_side != "right":
            problems.append(f"padding_side={self.padding_side!r}")
        if target_columns:
            problems.append(f"target_columns={list(target_columns)!r}")
        if "labels" in self._tokens and not self.next_token_labels:
            problems.append("per-token labels that are not a causal LM's next-token targets (next_token_labels=True)")
        if problems:
            raise ValueError(f"Batcher(packing=True) does not support {'; '.join(problems)}")
        empty = np.flatnonzero(self._lengths == 0)
        if empty.size:
            raise ValueError(f"Batcher(packing=True) needs every row to have a token (with attention_mask 1); "
                             f"row {empty[0]} has none")

    def _unpadded_lengths(self, columns: dict) -> np.ndarray:
        """Each row's length without the padding it already ends with: up to its last token whose
        ``attention_mask`` (if the data has one) is 1. Packing lays out only those tokens."""
        lengths = np.diff(self._tokens["input_ids"][1])
        if "attention_mask" not in columns:
            return lengths
        values, offsets = self._tokens["attention_mask"]
        positions = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
        last = np.full(self.num_rows, -1, np.int64)
        real = np.flatnonzero(values != 0)
        np.maximum.at(last, np.repeat(np.arange(self.num_rows), lengths)[real], positions[real])
        return last + 1

    def _fit_packing(self, multiple: int) -> tuple[int, tuple[int, ...]]:
        """``pack_length`` and ``row_buckets`` (see the class docstring)."""
        batches = [self._lengths[index] for e in range(self._fit_epochs()) for index in self._batch_indices(self.order(e))]
        return fit_packing(batches, int(self._lengths.max()), multiple, self._fit_saving(), AUTO_MAX_BUCKETS)

    def _rows_for(self, rows: int) -> int:
        """The smallest fitted row count that holds ``rows``; beyond them (a batch of a later epoch
        than the fit simulated), ``batch_size``: a sequence a row always fits."""
        at = int(np.searchsorted(self.row_buckets, rows))
        return self.row_buckets[at] if at < len(self.row_buckets) else self.batch_size

    def _check_start(self, start) -> None:
        if not isinstance(start, (int, np.integer)) or not 0 <= start <= self.num_batches:
            raise ValueError(f"start must be in [0, {self.num_batches}], got {start!r}")

    def _batch_maxima(self, lengths: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Each batch's longest row under ``order``."""
        if not self.num_batches:
            return np.zeros(0, np.int64)
        starts = np.arange(self.num_batches) * self.batch_size
        return np.maximum.reduceat(lengths[order][: self.num_batches * self.batch_size], starts)

    def _fit_buckets(self, multiple: int) -> tuple[int, ...]:
        """The ``"auto"`` buckets (see the class docstring)."""
        maxima = np.concatenate([self._batch_maxima(lengths, self.order(e)) for e in range(self._fit_epochs())
                                 for lengths in (self._lengths, *self._target_lengths.values())])
        longest = max(int(lengths.max()) for lengths in (self._lengths, *self._target_lengths.values()))
        return best_buckets(maxima, round_up(max(longest, 1), multiple), multiple, self._fit_saving(), AUTO_MAX_BUCKETS)

    def _fit_epochs(self) -> int:
        """How many epochs of batches the fitted shapes are chosen over (one unless shuffled)."""
        return 1 if not self.shuffle else max(1, min(AUTO_EPOCHS, -(-AUTO_BATCHES // max(self.num_batches, 1))))

    def _fit_saving(self) -> float:
        """The share of padded tokens a fitted shape more must save (see the class docstring)."""
        return max(AUTO_MIN_SAVING, AUTO_MIN_SAVED_BATCHES / max(self.num_batches, 1))

    def _length_for(self, longest: int) -> int:
        if self.packing:
            return self.pack_length
        if self.buckets is None:
            return round_up(max(longest, 1), self.pad_to_multiple_of)
        return self.buckets[int(np.searchsorted(self.buckets, longest))]

    def _batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        if self.packing:
            return self._packed_batch(index)
        size = self.batch_size
        length = self._length_for(int(self._lengths[index].max(initial=0)))
        left = self.padding_side == "left"
        choices = self.choices or 1
        sequences = (index[:, None] * choices + np.arange(choices)).reshape(-1)  # each row's choices in order
        shape = (size, choices, length) if self.choices else (size, length)
        batch = {}
        for name, (values, offsets) in self._tokens.items():
            pad = self.pad_token_id if name == "input_ids" else _TOKEN_PAD.get(name, 0)
            out = np.full((size * choices, length), pad, dtype=values.dtype)
            for i, row in enumerate(sequences):
                tokens = values[offsets[row] : offsets[row + 1]]
                if left:
                    out[i, length - len(tokens) :] = tokens
                else:
                    out[i, : len(tokens)] = tokens
            batch[name] = out.reshape(shape)
        for name, (values, offsets) in self._targets.items():
            target = self._length_for(int(self._target_lengths[name][index].max(initial=0)))
            out = np.full((size, target), _TOKEN_PAD.get(name, 0), dtype=values.dtype)
            for i, row in enumerate(index):
                tokens = values[offsets[row] : offsets[row + 1]]
                out[i, : len(tokens)] = tokens
            batch[name] = out
        return self._with_row_columns(batch, index)

    def _packed_batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        size, length = self.batch_size, self.pack_length
        place, used = first_fit(self._lengths[index], length)
        rows = self._rows_for(used)
        spans = [(r, c, self._lengths[row]) for (r, c), row in zip(place.tolist(), index)]
        batch = {}
        for name, (values, offsets) in self._tokens.items():
            pad = self.pad_token_id if name == "input_ids" else _TOKEN_PAD.get(name, 0)
            out = np.full((rows, length), pad, dtype=values.dtype)
            for (r, c, k), row in zip(spans, index):
                out[r, c : c + k] = values[offsets[row] : offsets[row] + k]
            batch[name] = out
        segments = np.zeros((rows, length), np.int32)
        starts = np.zeros((size,), np.int32)
        for i, (r, c, k) in enumerate(spans):
            segments[r, c : c + k] = i + 1
            starts[i] = r * length + c
        batch["segment_ids"], batch["segment_starts"] = segments, starts
        if self.next_token_labels and "labels" in batch:
            # a sequence's first token is never a target unpacked (nothing comes before it); packed,
            # the token before it is the last of another sequence, which must not learn to predict it
            rows, columns = np.divmod(starts[: len(index)], length)
            batch["labels"][rows, columns] = IGNORE_INDEX
        return self._with_row_columns(batch, index)

    def _with_row_columns(self, batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
        """Adds the per-row columns of rows ``index`` and ``sample_weight``, filled up to ``batch_size``."""
        n, size = len(index), self.batch_size
        for name, values in self._rows.items():
            out = np.zeros((size, *values.shape[1:]), dtype=values.dtype)
            out[:n] = values[index]
            batch[name] = out
        weight = np.zeros((size,), np.float32)
        weight[:n] = 1.0
        batch["sample_weight"] = weight
        return batch


def _check_fits(name: str, lengths: np.ndarray, largest: int) -> None:
    too_long = np.flatnonzero(lengths > largest)
    if too_long.size:
        shown = ", ".join(f"row {i} has {lengths[i]} tokens" for i in too_long[:5])
        more = f" (and {too_long.size - 5} more)" if too_long.size > 5 else ""
        what = "" if name == "input_ids" else f" in {name}"
        raise ValueError(
            f"{too_long.size} row(s){what} longer than the largest bucket {largest}: "
            f"{shown}{more}; truncate when tokenizing (max_length) or add a larger bucket"
        )


def _target_columns(columns: dict[str, Any], names: Sequence[str]) -> dict[str, tuple]:
    """Removes the ``names`` columns from ``columns`` and returns them; each must hold token lists."""
    if isinstance(names, str):
        raise TypeError(f"target_columns must be a sequence of column names, got the string {names!r}")
    out = {}
    for name in names:
        if name not in columns:
            raise ValueError(f"target column {name!r} is not in the data; columns: {list(columns)}")
        if name == "input_ids" or not isinstance(columns[name], tuple):
            raise ValueError(f"target column {name!r} must hold a token list per row (such as tokenize_seq2seq's "
                             "labels), not one value per row")
        out[name] = columns.pop(name)
    return out


def _raw_columns(data) -> dict[str, Any]:
    """``{name: per-row values}``, each either a NumPy array or ``(flat values, offsets)``."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        raise TypeError(f"Batcher takes one split, got a DatasetDict with splits {list(data)}")
    if isinstance(data, datasets.Dataset):
        table = data.with_format("arrow")[:]
        return {name: _arrow_column(name, table.column(name)) for name in table.column_names}
    if not isinstance(data, Mapping):
        raise TypeError(f"Batcher takes a datasets.Dataset or a mapping of columns, got {type(data).__name__}")
    return {name: _python_column(name, values) for name, values in data.items()}


def _arrow_column(name: str, column):
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if _is_list(kind) and _is_list(kind.value_type):  # a list of token lists per row: its choices
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        counts = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        return _Choices(counts.astype(np.int64), _arrow_column(name, column.flatten()))
    if _is_list(kind):
        inner = kind.value_type
        if not (pa.types.is_integer(inner) or pa.types.is_floating(inner) or pa.types.is_boolean(inner)):
            raise TypeError(f"column {name!r} holds {kind}, not numbers; remove it before batching")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return _numeric(name, _flat_values(column)), offsets
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise TypeError(f"column {name!r} holds {kind}, not numbers; remove it before batching")
    return _numeric(name, column.to_numpy())


def _is_list(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


@dataclasses.dataclass(frozen=True)
class _Choices:
    """A column holding a list of token lists per row (a multiple-choice row's choices)."""

    counts: np.ndarray  # choices per row
    sequences: tuple  # (values, offsets) over the choices, row after row


def _python_column(name: str, values):
    if isinstance(values, np.ndarray) and values.dtype != object:
        if values.ndim == 1:
            return _numeric(name, values)
        if values.ndim == 2:
            offsets = np.arange(values.shape[0] + 1, dtype=np.int64) * values.shape[1]
            return _numeric(name, values.reshape(-1)), offsets
        if values.ndim == 3:  # [rows, choices, tokens]
            counts = np.full(values.shape[0], values.shape[1], np.int64)
            return _Choices(counts, _python_column(name, values.reshape(-1, values.shape[2])))
        raise ValueError(f"column {name!r} has {values.ndim} dimensions; expected 1, 2 or 3 (rows, choices, tokens)")
    values = list(values)
    first = values[0] if values else None
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], (list, tuple, np.ndarray)):
        counts = np.array([len(v) for v in values], np.int64)
        return _Choices(counts, _python_column(name, [seq for v in values for seq in v]))
    if values and isinstance(values[0], (list, tuple, np.ndarray)):
        rows = [np.asarray(v) for v in values]
        if any(r.ndim != 1 for r in rows):
            raise ValueError(f"column {name!r} must hold flat rows of numbers")
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)])
        flat = np.concatenate(rows) if rows else np.zeros((0,), np.int32)
        return _numeric(name, flat), offsets
    return _numeric(name, np.asarray(values))


def _numeric(name: str, array: np.ndarray) -> np.ndarray:
    """int32 for integers and booleans, float32 for floats (JAX's defaults)."""
    if array.dtype.kind in "iub":
        return array.astype(np.int32)
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.size == 0:
        return array.astype(np.int32)
    raise TypeError(f"column {name!r} holds {array.dtype}, not numbers; remove it before batching")


def _choice_columns(columns: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
    """``(C, columns)`` with each column of choices (:class:`_Choices`) flattened to one sequence
    per choice, ``C`` the choices every row has; ``(None, columns)`` when no column has choices."""
    nested = {k: v for k, v in columns.items() if isinstance(v, _Choices)}
    if not nested:
        return None, columns
    if "input_ids" not in nested:
        raise ValueError(f"columns {sorted(nested)} hold a token list per choice but input_ids does not: a "
                         "multiple-choice row's input_ids are a token list per choice too")
    counts = nested["input_ids"].counts
    for name, column in nested.items():
        if not np.array_equal(column.counts, counts):
            row = int(np.flatnonzero(column.counts != counts)[0]) if len(column.counts) == len(counts) else 0
            raise ValueError(f"column {name!r} does not have input_ids' choices in row {row}")
    if counts.size and counts.min() == 0:
        row = int(np.argmin(counts))
        raise ValueError(f"multiple-choice row {row} has no choices (input_ids holds an empty list there)")
    most = int(counts.max()) if counts.size else 1
    # rows with fewer choices get empty ones (all padding), which the ...ForMultipleChoice models score -inf
    flat = {k: _padded_choices(v, most) if isinstance(v, _Choices) else v for k, v in columns.items()}
    unnested = [k for k, v in columns.items() if isinstance(v, tuple)]  # (values, offsets): a list per row
    if unnested:
        raise ValueError(f"columns {unnested} hold one token list per row beside input_ids' token list per choice: "
                         "give every per-token column a list per choice")
    return most, flat


def _padded_choices(column: _Choices, most: int) -> tuple:
    """``column``'s sequences with each row's choices followed by empty ones up to ``most``: the
    ``(values, offsets)`` of ``rows * most`` sequences (an empty one starts where its row ends)."""
    values, offsets = column.sequences
    starts = np.concatenate([[0], np.cumsum(column.counts)])  # each row's first sequence
    index = starts[:-1, None] + np.minimum(np.arange(most)[None, :], column.counts[:, None])
    return values, np.concatenate([np.asarray(offsets)[index.reshape(-1)], np.asarray(offsets)[-1:]])


def _split_columns(columns: dict[str, Any], choices: int = 1):
    """Per-token columns as ``(values, offsets)``, per-row columns as arrays, and the row count
    (with ``choices`` sequences per row, the per-token columns hold ``rows * choices``)."""
    if "input_ids" not in columns or not isinstance(columns["input_ids"], tuple):
        raise ValueError(f"Batcher needs an input_ids column of token lists; columns: {list(columns)}")
    counts = {k: (len(v[1]) - 1) // choices if isinstance(v, tuple) else len(v) for k, v in columns.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"columns have different numbers of rows: {counts}")
    num_rows = counts["input_ids"]
    lengths = np.diff(columns["input_ids"][1])
    tokens, rows = {}, {}
    for name, value in columns.items():
        if not isinstance(value, tuple):
            rows[name] = value
            continue
        values, offsets = value
        row_lengths = np.diff(offsets)
        if np.array_equal(row_lengths, lengths):
            tokens[name] = value
        elif name in ("attention_mask", "token_type_ids") or len(set(row_lengths.tolist())) > 1:
            bad = np.flatnonzero(row_lengths != lengths)[:5]
            shown = ", ".join(f"row {i}: {row_lengths[i]} vs {lengths[i]}" for i in bad)
            raise ValueError(f"column {name!r} is not as long as input_ids in every row ({shown})")
        else:  # a fixed-length vector per row, such as multi-label targets
            rows[name] = values.reshape(num_rows, -1)
    if "attention_mask" not in tokens:
        tokens["attention_mask"] = (np.ones(len(columns["input_ids"][0]), np.int32), columns["input_ids"][1])
    return tokens, rows, num_rows
