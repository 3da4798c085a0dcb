"""SQuAD's evaluation: each question's answer out of its windows' start and end logits, then exact
match and F1 against the labelled answers, as SQuAD's official scripts score them.

    windows = tokenize_question_answering(squad["validation"], tokenizer, max_length=384, stride=128)
    logits = trainer.predict(windows)                    # [windows, length, 2]
    predicted = answer_questions(windows, logits, squad["validation"]["context"])
    squad_metrics(predicted, squad["validation"]["answers"])   # {"exact_match": ..., "f1": ...}
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

_WINDOW_COLUMNS = ("example_index", "context_offsets")
_PUNCTUATION = frozenset(string.punctuation)


def answer_questions(windows, logits, contexts: Sequence[str], *, max_answer_tokens: int = 30,
                     null_answers: bool = False) -> list[str]:
    """Each question's answer: of the spans of context tokens in any of its windows that end where
    or after they start and hold at most ``max_answer_tokens`` tokens, the one whose start logit plus
    end logit is largest (transformers' question-answering recipe, which searches only each window's
    20 likeliest starts and ends; this search is exhaustive), as the context's characters.

    Args:
      windows: :func:`tokenize_question_answering`'s windows (a ``datasets.Dataset`` or a dict of
        lists with its ``example_index`` and ``context_offsets`` columns).
      logits: ``[windows, length, 2]`` start and end logits, one row per window in order, padded on
        the right past each window's tokens (``Trainer.predict``'s output).
      contexts: the questions' contexts, indexed as ``example_index`` counts the rows.
      max_answer_tokens: the longest answer, in tokens.
      null_answers: SQuAD 2.0, where a question may have no answer: answer ``""`` where the
        likeliest "no answer" (start and end on a window's first token, the least likely of its
        windows') scores above the best span, as transformers' recipe with
        ``null_score_diff_threshold=0``.

    Returns:
      One answer per context (``""`` for a context no window holds a span of).

    Raises:
      ValueError: a missing column, logits of another shape or row count, a window longer than
        its logits row, or an ``example_index`` beyond ``contexts`` (each named).
    """
    names = windows.column_names if hasattr(windows, "column_names") else list(windows)
    missing = [c for c in _WINDOW_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"answer_questions: windows have no {' or '.join(missing)} column (columns: {names}); "
                         "tokenize them with peftjax.training.tokenize_question_answering")
    spans = best_spans(list(windows["example_index"]), list(windows["context_offsets"]), logits, len(contexts),
                       max_answer_tokens=max_answer_tokens)
    answers = []
    for example, context in enumerate(contexts):
        found = spans.get(example)
        if found is None or (null_answers and found.null_score > found.score):
            answers.append("")
        else:
            answers.append(context[found.first_char:found.end_char])
    return answers


class Span(NamedTuple):
    """A question's best span: its score (start logit + end logit), its characters
    ``[first_char, end_char)`` in the context, the window it was found in and its first and last
    token there; ``null_score``: the least likely "no answer" over the question's windows."""

    score: float
    first_char: int
    end_char: int
    window: int
    first: int
    last: int
    null_score: float


def best_spans(examples: Sequence[int], offsets: Sequence, logits, n_examples: int, *,
               max_answer_tokens: int = 30) -> dict[int, Span]:
    """Each question's :class:`Span` (see :func:`answer_questions`) from its windows: ``examples``
    each window's question, ``offsets`` each window's context tokens' characters (``[-1, -1]``
    elsewhere), ``logits`` ``[windows, length, 2]``. A question whose windows hold no span is absent."""
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be >= 1, got {max_answer_tokens}")
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 3 or logits.shape[0] != len(examples) or logits.shape[2] != 2:
        raise ValueError(f"answer_questions: logits of shape {logits.shape}; expected [{len(examples)} windows, "
                         "length, 2] (start and end logits, Trainer.predict's output)")
    best: dict[int, Span] = {}
    null: dict[int, float] = {}
    for window, (example, spans) in enumerate(zip(examples, offsets)):
        example = int(example)
        if not 0 <= example < n_examples:
            raise ValueError(f"answer_questions: window {window} has example_index {example}; there are "
                             f"{n_examples} contexts")
        spans = np.asarray(spans, np.int64).reshape(-1, 2)
        n = len(spans)
        if n > logits.shape[1]:
            raise ValueError(f"answer_questions: window {window} has {n} tokens, its logits row only "
                             f"{logits.shape[1]}")
        start, end = logits[window, :n, 0], logits[window, :n, 1]
        null[example] = min(null.get(example, np.inf), start[0] + end[0])
        inside = spans[:, 0] >= 0
        first, last = np.arange(n)[:, None], np.arange(n)[None, :]
        valid = inside[:, None] & inside[None, :] & (last >= first) & (last - first < max_answer_tokens)
        if not valid.any():
            continue
        scores = np.where(valid, start[:, None] + end[None, :], -np.inf)
        i, j = np.unravel_index(int(scores.argmax()), scores.shape)
        if example not in best or scores[i, j] > best[example].score:
            best[example] = Span(float(scores[i, j]), int(spans[i, 0]), int(spans[j, 1]), window, int(i), int(j), 0.0)
    return {example: span._replace(null_score=null[example]) for example, span in best.items()}


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation before comparing answers: lower case, no punctuation, no articles
    (a, an, the), single spaces."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    predicted, true = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not predicted or not true:  # SQuAD 2.0: "no answer" scores 1 against "no answer" only
        return float(predicted == true)
    common = sum((collections.Counter(predicted) & collections.Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Sequence[str], answers: Sequence) -> dict[str, float]:
    """SQuAD's exact match and F1, in percent: each prediction against the best of its question's
    labelled answers after :func:`normalize_answer`, F1 over their words; a question without
    labelled answers (SQuAD 2.0) is answered right by ``""`` only.

    >>> squad_metrics(["The Eiffel tower", "in Paris"], [{"text": ["Eiffel Tower"]}, ["Paris, France"]])
    {'exact_match': 50.0, 'f1': 75.0}

    Args:
      predictions: one answer per question.
      answers: per question, SQuAD's ``{"text": [...], "answer_start": [...]}`` or a list of texts.

    Raises:
      ValueError: the two differ in length.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"squad_metrics: {len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    exact = f1 = 0.0
    for prediction, truth in zip(predictions, answers):
        texts = list(truth["text"] if isinstance(truth, dict) else truth) or [""]
        exact += max(float(normalize_answer(prediction) == normalize_answer(t)) for t in texts)
        f1 += max(_f1(prediction, t) for t in texts)
    return {"exact_match": 100 * exact / len(predictions), "f1": 100 * f1 / len(predictions)}
