"""Checks the review dataset that peftjax ships (``peftjax/data/reviews_{train,eval}.jsonl``).

    python scripts/check_reviews_data.py            # the shipped files
    python scripts/check_reviews_data.py DIR        # reviews_train.jsonl / reviews_eval.jsonl in DIR

Prints the counts per split and class, checks every row (a non-empty ``text``, an integer
``label`` in 0..2, no duplicate within a split), looks for eval items that repeat a train item
(exact, after lowercasing and normalising punctuation and spaces) or nearly repeat one (word-level
Jaccard similarity above 0.8, e.g. the same sentence with one word changed), and reports the
majority-class and bag-of-words logistic-regression baselines on the eval split.

Exits with status 1 if any row is malformed or any overlap or duplicate is found, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peftjax.training._baselines import (
    bag_of_words_baseline,
    cross_split_overlaps,
    majority_baseline,
    normalise_text,
    tokenize,
)

LABELS = {0: "negative", 1: "neutral/mixed", 2: "positive"}
NEAR_THRESHOLD = 0.8


def load(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a JSON-lines file and a list of problems found in them."""
    rows, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            problems.append(f"{path.name}:{number}: blank line")
            continue
        row = json.loads(line)
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{path.name}:{number}: text missing or empty")
        if not isinstance(label, int) or isinstance(label, bool) or label not in LABELS:
            problems.append(f"{path.name}:{number}: label {label!r} not in {sorted(LABELS)}")
        rows.append(row)
    return rows, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", default=str(ROOT / "peftjax" / "data"))
    args = parser.parse_args(argv)
    directory = Path(args.directory)

    splits, problems = {}, []
    for split in ("train", "eval"):
        splits[split], found = load(directory / f"reviews_{split}.jsonl")
        problems += found

    print(f"{'split':<6} {'rows':>5}  " + "  ".join(f"{LABELS[k]:>13}" for k in LABELS) + "   words/row min-median-max")
    for split, rows in splits.items():
        counts = Counter(r["label"] for r in rows)
        lengths = sorted(len(tokenize(r["text"])) for r in rows)
        print(f"{split:<6} {len(rows):>5}  " + "  ".join(f"{counts.get(k, 0):>13}" for k in LABELS)
              + f"   {lengths[0]}-{lengths[len(lengths) // 2]}-{lengths[-1]}")

    for split, rows in splits.items():
        seen: dict[str, int] = {}
        for i, row in enumerate(rows):
            key = normalise_text(row["text"])
            if key in seen:
                problems.append(f"duplicate within {split}: rows {seen[key] + 1} and {i + 1}: {row['text']!r}")
            seen.setdefault(key, i)

    train, evaluation = splits["train"], splits["eval"]
    train_texts, eval_texts = [r["text"] for r in train], [r["text"] for r in evaluation]
    exact, near = cross_split_overlaps(train_texts, eval_texts, threshold=NEAR_THRESHOLD)
    print(f"\neval items equal to a train item (normalised): {len(exact)}")
    for i, j in exact:
        problems.append(f"exact overlap: train row {i + 1} = eval row {j + 1}: {eval_texts[j]!r}")
    print(f"eval items near a train item (word Jaccard > {NEAR_THRESHOLD}): {len(near)}")
    for i, j, sim in near:
        problems.append(f"near overlap ({sim:.2f}): train row {i + 1} {train_texts[i]!r} ~ "
                        f"eval row {j + 1} {eval_texts[j]!r}")

    if not any(p.startswith(("duplicate", "exact", "near")) or ": label" in p for p in problems):
        train_labels, eval_labels = [r["label"] for r in train], [r["label"] for r in evaluation]
        majority = majority_baseline(train_labels, eval_labels)
        bow = bag_of_words_baseline(train_texts, train_labels, eval_texts, eval_labels)
        print("\nbaselines on the eval split (trained on train):")
        print(f"  majority class:                                   {majority:.4f}")
        print(f"  bag-of-words logistic regression (1-2 grams):     {bow:.4f}")

    if problems:
        print(f"\n{len(problems)} problem(s):")
        for problem in problems:
            print("  " + problem)
        return 1
    print("\nOK: no malformed rows, no duplicates, no train/eval overlap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
