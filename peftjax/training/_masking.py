"""Masked language modelling's inputs: :func:`mask_tokens`, the masking of transformers'
``DataCollatorForLanguageModeling`` (BERT's recipe) as a pure NumPy function."""

from __future__ import annotations

import numpy as np


def mask_tokens(
    input_ids,
    rng,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_tokens_mask=None,
    attention_mask=None,
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` for a masked LM: each token is chosen with ``mlm_probability`` (never a
    special token, nor padding where ``attention_mask`` is 0); a chosen token's label is the token,
    every other label -100; of the chosen, ``mask_replace_prob`` become ``mask_token_id``,
    ``random_replace_prob`` a token drawn uniformly from the vocabulary, the rest stay as they were,
    as transformers' ``DataCollatorForLanguageModeling`` draws them (its defaults: 0.15, 0.8, 0.1).

    Args:
      input_ids: ``[batch, seq]`` token ids.
      rng: a ``numpy.random.Generator`` or a seed for one: the same seed, the same masks.
      mask_token_id, vocab_size: the tokenizer's ``mask_token_id`` and ``len(tokenizer)``.
      special_tokens_mask: ``[batch, seq]``, 1 on the tokens never chosen (``[CLS]``, ``[SEP]``:
        what the tokenizer returns with ``return_special_tokens_mask=True``).
      attention_mask: ``[batch, seq]``, 0 on padding, which is never chosen.

    Raises:
      ValueError: a probability outside ``[0, 1]``, replacement shares summing past 1, a mask shaped
        unlike ``input_ids``, or a vocabulary that does not hold ``mask_token_id``.
    """
    ids = np.asarray(input_ids)
    for name, p in (("mlm_probability", mlm_probability), ("mask_replace_prob", mask_replace_prob),
                    ("random_replace_prob", random_replace_prob)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name}={p!r}: expected a probability in [0, 1]")
    if mask_replace_prob + random_replace_prob > 1.0:
        raise ValueError(f"mask_replace_prob + random_replace_prob = {mask_replace_prob + random_replace_prob}: "
                         "the shares of the chosen tokens replaced cannot pass 1")
    if mask_token_id is None or not 0 <= int(mask_token_id) < int(vocab_size):
        raise ValueError(f"mask_token_id={mask_token_id!r}: expected a token id in [0, vocab_size={vocab_size}) "
                         "(a tokenizer without a mask token cannot train a masked LM)")
    excluded = np.zeros(ids.shape, bool)
    for name, mask, value in (("special_tokens_mask", special_tokens_mask, 1),
                              ("attention_mask", attention_mask, 0)):
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"{name}: expected the shape of input_ids {ids.shape}, got {mask.shape}")
        excluded |= mask == value
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    chosen = (rng.random(ids.shape) < mlm_probability) & ~excluded
    labels = np.where(chosen, ids, -100)
    replaced = chosen & (rng.random(ids.shape) < mask_replace_prob)
    rest = 1.0 - mask_replace_prob
    randomised = chosen & ~replaced & (rng.random(ids.shape) < (random_replace_prob / rest if rest > 0 else 0.0))
    inputs = np.where(replaced, int(mask_token_id), ids)
    inputs = np.where(randomised, rng.integers(0, int(vocab_size), ids.shape), inputs).astype(ids.dtype)
    return inputs, labels.astype(ids.dtype)
