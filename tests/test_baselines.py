"""The reference baselines (majority class, bag-of-words logistic regression) and the shipped review data."""

import importlib.resources
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from peftjax.training._baselines import (
    bag_of_words_baseline,
    bag_of_words_features,
    cross_split_overlaps,
    fit_logistic_regression,
    jaccard,
    majority_baseline,
    normalise_text,
    predict_logistic_regression,
    tokenize,
)

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------ helpers


def test_tokenize_keeps_inner_apostrophes_and_lowercases():
    assert tokenize("I Wouldn't call it 'good' - the kids' room, it\u2019s 90s!") == [
        "i", "wouldn't", "call", "it", "good", "the", "kids", "room", "it's", "90s",
    ]
    assert normalise_text("  Not BAD,  at all!! ") == "not bad at all"


def test_jaccard_and_cross_split_overlaps():
    assert jaccard("a b c", "a b c") == 1.0
    assert jaccard("a b", "c d") == 0.0
    assert jaccard("", "") == 1.0
    train = ["The soup was cold and the bread was stale.", "Great film!", "Loved the hotel staff."]
    evaluation = [
        "great FILM",  # exact after normalisation
        "The soup was cold and the bread was hard.",  # one word changed: 6 of 8 distinct words, 0.75
        "Nothing in common here.",
    ]
    exact, near = cross_split_overlaps(train, evaluation, threshold=0.6)
    assert exact == [(1, 0)]
    assert [(i, j) for i, j, _ in near] == [(0, 1)]
    assert near[0][2] == pytest.approx(jaccard(train[0], evaluation[1]))
    # the 0.8 default: one word swapped in a ten-word sentence (9 shared / 11 in all) is flagged
    a = "one two three four five six seven eight nine ten"
    b = "one two three four five six seven eight nine eleven"
    assert cross_split_overlaps([a], [b])[1][0][:2] == (0, 0)
    assert cross_split_overlaps([a], ["one two three four five"])[1] == []


# ----------------------------------------------------------------------------------------- majority


def test_majority_baseline_matches_hand_computed_value():
    # train majority is 2 (three of six); eval has two 2s out of five
    assert majority_baseline([0, 2, 1, 2, 2, 0], [2, 0, 1, 2, 1]) == pytest.approx(2 / 5)
    # ties go to the smallest label
    assert majority_baseline([1, 0, 1, 0], [0, 0, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        majority_baseline([], [1])


# ------------------------------------------------------------------------------------ bag of words


def _synthetic(n_per_class: int, seed: int) -> tuple[list[str], list[int]]:
    """Three classes, each marked by its own cue words inside shared filler."""
    rng = np.random.default_rng(seed)
    cues = [["awful", "dreadful", "broken"], ["average", "ordinary", "middling"], ["superb", "lovely", "great"]]
    filler = ["the", "film", "hotel", "app", "was", "really", "quite", "and", "food", "staff", "phone"]
    texts, labels = [], []
    for label, words in enumerate(cues):
        for _ in range(n_per_class):
            body = list(rng.choice(filler, size=6)) + [str(rng.choice(words))]
            rng.shuffle(body)
            texts.append(" ".join(body))
            labels.append(label)
    return texts, labels


def test_bag_of_words_separable_data_is_perfect():
    train_texts, train_labels = _synthetic(40, seed=0)
    eval_texts, eval_labels = _synthetic(15, seed=1)
    assert bag_of_words_baseline(train_texts, train_labels, eval_texts, eval_labels) == 1.0


def test_bag_of_words_shuffled_labels_are_near_chance():
    train_texts, train_labels = _synthetic(60, seed=0)
    eval_texts, eval_labels = _synthetic(60, seed=1)
    rng = np.random.default_rng(0)
    shuffled = list(rng.permutation(train_labels))
    accuracy = bag_of_words_baseline(train_texts, shuffled, eval_texts, eval_labels)
    assert abs(accuracy - 1 / 3) < 0.15, accuracy


def test_bag_of_words_is_deterministic_and_seed_independent():
    train_texts, train_labels = _synthetic(30, seed=2)
    eval_texts, eval_labels = _synthetic(10, seed=3)
    eval_labels = list(np.random.default_rng(4).permutation(eval_labels))  # not trivially 1.0
    runs = {bag_of_words_baseline(train_texts, train_labels, eval_texts, eval_labels, seed=s) for s in (0, 0, 1, 7)}
    assert len(runs) == 1


def test_features_use_train_vocabulary_and_unit_rows():
    x_train, x_other, vocabulary = bag_of_words_features(["not bad at all", "bad"], ["not good", "unseen words"])
    assert vocabulary == sorted(["not", "bad", "at", "all", "not bad", "bad at", "at all"])
    np.testing.assert_allclose(np.linalg.norm(x_train, axis=1), 1.0)
    assert np.count_nonzero(x_other[0]) == 1  # only "not"; "good" and "not good" were never seen
    assert not x_other[1].any()


def test_logistic_regression_converges_to_the_penalised_optimum():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 5))
    y = np.argmax(x[:, :3] + 0.5 * rng.standard_normal((120, 3)), axis=1)
    w0, b0 = fit_logistic_regression(x, y, l2=1e-2, seed=0)
    w1, b1 = fit_logistic_regression(x, y, l2=1e-2, seed=5)
    np.testing.assert_allclose(w0, w1, atol=1e-4)  # gradient tol 1e-7 / strong convexity 1e-2
    np.testing.assert_allclose(predict_logistic_regression(x, w0, b0), predict_logistic_regression(x, w1, b1))
    # stationarity: the penalised gradient vanishes at the returned point
    logits = x @ w0 + b0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(3)[y]
    np.testing.assert_allclose(x.T @ residual / len(y) + 1e-2 * w0, 0, atol=1e-6)
    np.testing.assert_allclose(residual.mean(0), 0, atol=1e-6)


# ----------------------------------------------------------------------------------- shipped files


def _shipped(split: str) -> list[dict]:
    path = importlib.resources.files("peftjax") / "data" / f"reviews_{split}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def reviews():
    return {split: _shipped(split) for split in ("train", "eval")}


def test_shipped_reviews_sizes_and_labels(reviews):
    train, evaluation = reviews["train"], reviews["eval"]
    assert len(train) >= 600 and len(evaluation) >= 200
    for rows in (train, evaluation):
        assert all(set(r) == {"text", "label"} for r in rows)
        assert all(isinstance(r["text"], str) and r["text"].strip() for r in rows)
        assert all(type(r["label"]) is int and r["label"] in {0, 1, 2} for r in rows)
        counts = Counter(r["label"] for r in rows)
        assert len(counts) == 3
        assert min(counts.values()) >= 0.25 * len(rows)  # roughly balanced


def test_shipped_reviews_have_no_duplicates_or_cross_split_overlap(reviews):
    train = [r["text"] for r in reviews["train"]]
    evaluation = [r["text"] for r in reviews["eval"]]
    for texts in (train, evaluation):
        normalised = [normalise_text(t) for t in texts]
        assert len(set(normalised)) == len(normalised)
    exact, near = cross_split_overlaps(train, evaluation, threshold=0.8)
    assert exact == []
    assert near == []


def test_check_script_flags_an_overlap(tmp_path, reviews):
    def write(rows_by_split):
        for split, rows in rows_by_split.items():
            (tmp_path / f"reviews_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    script = [sys.executable, str(ROOT / "scripts" / "check_reviews_data.py"), str(tmp_path)]
    clean = {"train": reviews["train"][:60], "eval": reviews["eval"][:20]}
    write(clean)
    ok = subprocess.run(script, check=False, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "majority class" in ok.stdout
    leaked = dict(clean, eval=clean["eval"] + [clean["train"][0]])
    write(leaked)
    bad = subprocess.run(script, check=False, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "exact overlap" in bad.stdout
