"""``peftjax.training.rouge_metrics`` against Google's ``rouge_score`` (the scorer behind
``evaluate``'s ROUGE and transformers' summarisation example), per row and averaged: every type,
with and without NLTK's Porter stemmer, several references, punctuation, case, digits, accents,
lines and empty texts."""

from __future__ import annotations

import numpy as np
import pytest

from peftjax.training import rouge_metrics, rouge_scores

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
porter = pytest.importorskip("nltk.stem.porter")

WORDS = ["the", "cat", "cats", "sat", "sitting", "on", "mat", "mats", "a", "dog", "running", "ran", "runs",
         "quickly", "over", "lazy", "fox", "was", "has", "its", "généralement", "42", "x-ray", "Paris,", "PARIS", "it's", "...", "!"]
TYPES = ["rouge1", "rouge2", "rouge3", "rougeL", "rougeLsum"]


def texts(rng, count):
    """Random texts of 0 to 14 words, some with line breaks (sentences for rougeLsum)."""
    out = []
    for _ in range(count):
        words = list(rng.choice(WORDS, rng.integers(0, 15)))
        for i in sorted(rng.choice(len(words) + 1, rng.integers(0, 3)), reverse=True):
            words.insert(int(i), "\n")
        out.append(" ".join(words).replace(" \n ", "\n"))
    return out


@pytest.mark.parametrize("stem", [False, True])
def test_each_row_s_scores_are_rouge_score_s(stem):
    rng = np.random.default_rng(int(stem))
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stem)
    stemmer = porter.PorterStemmer().stem if stem else None
    predictions, references = texts(rng, 200), texts(rng, 200)
    predictions[:3] = ["", "!!!", "The cat sat on the mat."]
    references[:3] = ["the cat", "", "the cat\nsat on the mat"]
    for prediction, reference in zip(predictions, references):
        want = {k: v.fmeasure for k, v in scorer.score(reference, prediction).items()}
        got = rouge_scores(prediction, reference, TYPES, stemmer)
        np.testing.assert_allclose([got[k] for k in TYPES], [want[k] for k in TYPES], atol=1e-12,
                                   err_msg=repr((prediction, reference)))
    assert any(rouge_scores(p, r, ["rougeLsum"])["rougeLsum"] != rouge_scores(p, r, ["rougeL"])["rougeL"]
               for p, r in zip(predictions, references))  # the lines matter


def test_the_mean_over_rows_takes_each_row_s_best_reference():
    rng = np.random.default_rng(5)
    scorer = rouge_scorer.RougeScorer(TYPES)
    predictions = texts(rng, 50)
    references = [texts(rng, int(rng.integers(1, 4))) for _ in range(50)]
    references[0] = references[0][0]  # one reference as a plain string
    want = {k: 0.0 for k in TYPES}
    for prediction, refs in zip(predictions, references):
        best = scorer.score_multi([refs] if isinstance(refs, str) else refs, prediction)
        for k in TYPES:
            want[k] += 100 * best[k].fmeasure / len(predictions)
    got = rouge_metrics(predictions, references, rouge_types=TYPES)
    np.testing.assert_allclose([got[k] for k in TYPES], [want[k] for k in TYPES], rtol=1e-12)
    assert set(rouge_metrics(predictions[:2], references[:2])) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="row 0 has no reference"):
        rouge_metrics(["a"], [[]])
    with pytest.raises(ValueError, match="rouge type 'rougeW'"):
        rouge_metrics(["a"], ["a"], rouge_types=["rougeW"])
