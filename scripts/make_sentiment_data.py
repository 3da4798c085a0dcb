"""Builds the small sentiment dataset that peftjax ships for its offline main job.

    python scripts/make_sentiment_data.py   # rewrites peftjax/data/sentiment_{train,eval}.jsonl

Short movie-review sentences, labelled 1 (positive) or 0 (negative), composed from hand-written
phrase lists with a fixed seed. To keep it from being a bag-of-words puzzle, a quarter of the
sentences flip their polarity with a negation ("was not great" is negative), some mix a concession
("despite the weak plot, the acting was superb") whose main clause decides the label, and the
aspects and openers are shared by both classes. Train and eval use disjoint phrase templates for
the concessions, so eval accuracy measures more than memorisation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261128
OUT = Path(__file__).resolve().parent.parent / "peftjax" / "data"

ASPECTS = ["the acting", "the plot", "the soundtrack", "the dialogue", "the ending", "the pacing",
           "the cinematography", "the script", "the cast", "the direction", "the story", "the visuals"]
OPENERS = ["Honestly,", "I thought", "In my opinion,", "Overall,", "To be fair,", "Frankly,", "", "",
           "My friends agreed that", "After two hours,"]
POSITIVE = ["wonderful", "superb", "moving", "brilliant", "delightful", "gripping", "charming",
            "excellent", "beautiful", "hilarious", "touching", "masterful", "great", "fantastic"]
NEGATIVE = ["dull", "terrible", "boring", "clumsy", "awful", "lifeless", "predictable", "weak",
            "painful", "forgettable", "tedious", "messy", "bad", "disappointing"]
VERDICT_POS = ["I would watch it again.", "Highly recommended.", "A real treat.", "Worth every minute.",
               "I loved it.", "It stayed with me for days."]
VERDICT_NEG = ["I want my money back.", "Skip this one.", "A waste of an evening.", "I nearly fell asleep.",
               "I regret watching it.", "Not worth the ticket."]
CONCESSIONS = {
    "train": ["Despite {a} being {x},", "Although {a} was {x},", "Even though {a} felt {x},"],
    "eval": ["While {a} seemed {x},", "Granted, {a} was {x}, but"],
}


def sentence(rng: random.Random, split: str) -> tuple[str, int]:
    label = rng.randint(0, 1)
    aspect = rng.choice(ASPECTS)
    kind = rng.random()
    if kind < 0.25:  # negation flips the adjective's polarity
        adj = rng.choice(NEGATIVE if label else POSITIVE)
        text = f"{rng.choice(OPENERS)} {aspect} was not {adj} at all."
    elif kind < 0.5:  # concession: the main clause decides
        other = rng.choice(ASPECTS)
        weak = rng.choice(NEGATIVE if label else POSITIVE)
        strong = rng.choice(POSITIVE if label else NEGATIVE)
        lead = rng.choice(CONCESSIONS[split]).format(a=other, x=weak)
        text = f"{lead} {aspect} was {strong}."
    else:
        adj = rng.choice(POSITIVE if label else NEGATIVE)
        verdict = rng.choice(VERDICT_POS if label else VERDICT_NEG)
        text = f"{rng.choice(OPENERS)} {aspect} was {adj}. {verdict}"
    text = " ".join(text.split())
    return text[0].upper() + text[1:], label


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", 800, SEED), ("eval", 200, SEED + 1)):
        rng = random.Random(seed)
        rows = [sentence(rng, split) for _ in range(n)]
        with open(OUT / f"sentiment_{split}.jsonl", "w") as f:
            for text, label in rows:
                f.write(json.dumps({"text": text, "label": label}) + "\n")
        print(f"{split}: {n} rows, {sum(label for _, label in rows)} positive")


if __name__ == "__main__":
    main()
