"""ROUGE, the summarisation scores: what Google's ``rouge_score`` computes (the scorer behind
``evaluate.load("rouge")`` and transformers' summarisation example), without its dependencies.

    rouge_metrics(generated, references)   # {"rouge1": ..., "rouge2": ..., "rougeL": ..., "rougeLsum": ...}

Each text is lowercased, every run of characters other than ``a-z0-9`` becomes a space, and the
words are the tokens (``rouge_score``'s default tokenizer; ``stemmer`` stems words longer than
three characters, as its ``use_stemmer=True`` does with NLTK's Porter stemmer, which a caller
passes: ``stemmer=nltk.stem.porter.PorterStemmer().stem``). ``rougeN`` is the F-measure of the
clipped n-gram overlap, ``rougeL`` of the longest common subsequence, ``rougeLsum`` of the
summary-level union LCS over the texts' lines (ROUGE-1.5.5's, which counts each token once).
A row with several references takes, per score, the reference of the highest F-measure
(``score_multi``). The result is each score's mean F-measure over the rows, times 100, as
transformers' summarisation example reports it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str, stemmer: Callable[[str], str] | None = None) -> list[str]:
    """``text``'s ROUGE tokens: lowercased words of ``a-z0-9``, those longer than three characters
    stemmed by ``stemmer`` where given (the stem kept only if still ``a-z0-9``)."""
    words = _NON_ALPHANUMERIC.sub(" ", text.lower()).split()
    if stemmer is not None:
        words = [stemmer(w) if len(w) > 3 else w for w in words]
    return [w for w in words if w and _NON_ALPHANUMERIC.search(w) is None]


def _f(hits: int, predicted: int, reference: int) -> float:
    if not hits or not predicted or not reference:
        return 0.0
    precision, recall = hits / predicted, hits / reference
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _lcs_table(a: list[str], b: list[str]) -> list[list[int]]:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        row, above = table[i], table[i - 1]
        for j, y in enumerate(b, 1):
            row[j] = above[j - 1] + 1 if x == y else max(above[j], row[j - 1])
    return table


def _lcs_positions(reference: list[str], candidate: list[str]) -> list[int]:
    """The positions in ``reference`` of one longest common subsequence (``rouge_score``'s backtrack)."""
    table, i, j, out = _lcs_table(reference, candidate), len(reference), len(candidate), []
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out[::-1]


def _summary_lcs(reference: list[list[str]], candidate: list[list[str]]) -> float:
    """ROUGE-Lsum's F-measure over sentences (lists of tokens): each reference sentence's union LCS
    with every candidate sentence, each token counted at most as often as both texts hold it."""
    m, n = sum(map(len, reference)), sum(map(len, candidate))
    if not m or not n:
        return 0.0
    left_r, left_c = Counter(t for s in reference for t in s), Counter(t for s in candidate for t in s)
    hits = 0
    for sentence in reference:
        union = sorted(set().union(*(_lcs_positions(sentence, c) for c in candidate)))
        for token in (sentence[i] for i in union):
            if left_c[token] > 0 and left_r[token] > 0:
                hits += 1
                left_c[token] -= 1
                left_r[token] -= 1
    return _f(hits, n, m)


def rouge_scores(prediction: str, reference: str, rouge_types: Sequence[str] = ROUGE_TYPES,
                 stemmer: Callable[[str], str] | None = None) -> dict[str, float]:
    """One prediction's F-measure (0 to 1) against one reference, per type (``rougeN`` for any
    ``N`` >= 1, ``rougeL``, ``rougeLsum``).

    Raises:
      ValueError: an unknown rouge type (named).
    """
    predicted, expected = rouge_tokens(prediction, stemmer), rouge_tokens(reference, stemmer)
    out = {}
    for kind in rouge_types:
        if kind == "rougeL":
            lcs = _lcs_table(expected, predicted)[-1][-1] if expected and predicted else 0
            out[kind] = _f(lcs, len(predicted), len(expected))
        elif kind == "rougeLsum":
            lines = lambda text: [rouge_tokens(s, stemmer) for s in text.split("\n") if s]  # noqa: E731
            out[kind] = _summary_lcs(lines(reference), lines(prediction))
        elif re.fullmatch(r"rouge[1-9][0-9]*", kind):
            n = int(kind[5:])
            p, r = _ngrams(predicted, n), _ngrams(expected, n)
            out[kind] = _f(sum((p & r).values()), sum(p.values()), sum(r.values()))
        else:
            raise ValueError(f"rouge type {kind!r} is not one of rougeN (N >= 1), rougeL, rougeLsum")
    return out


def rouge_metrics(predictions: Sequence[str], references: Sequence, *, rouge_types: Sequence[str] = ROUGE_TYPES,
                  stemmer: Callable[[str], str] | None = None) -> dict[str, float]:
    """The mean F-measure of each ROUGE type over the rows, in percent.

    >>> rouge_metrics(["the cat sat on the mat"], ["the cat lay on the mat"])["rouge1"]
    83.33333333333334

    Args:
      predictions: one generated text per row.
      references: per row, a reference text or a list of them (the best counts, per type).
      rouge_types: which scores.
      stemmer: a word stemmer (``nltk.stem.porter.PorterStemmer().stem`` gives ``rouge_score``'s
        ``use_stemmer=True``); none by default, as ``rouge_score``'s default.

    Raises:
      ValueError: the two differ in length; a row without a reference; an unknown type.
    """
    if len(predictions) != len(references):
        raise ValueError(f"rouge_metrics: {len(predictions)} predictions for {len(references)} references")
    totals = dict.fromkeys(rouge_types, 0.0)
    for i, (prediction, truth) in enumerate(zip(predictions, references)):
        texts = [truth] if isinstance(truth, str) else list(truth)
        if not texts:
            raise ValueError(f"rouge_metrics: row {i} has no reference")
        scores = [rouge_scores(prediction, t, rouge_types, stemmer) for t in texts]
        for kind in rouge_types:
            totals[kind] += max(s[kind] for s in scores)
    return {kind: 100 * total / len(predictions) if predictions else 0.0 for kind, total in totals.items()}
