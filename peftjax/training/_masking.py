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


class DataCollatorForLanguageModeling:
    """Masks each batch anew as the Trainer draws it: transformers'
    ``DataCollatorForLanguageModeling(tokenizer, mlm_probability=...)`` (dynamic masking, RoBERTa's),
    for :class:`~peftjax.training.Trainer`'s ``data_collator``.

    >>> collator = DataCollatorForLanguageModeling(tokenizer)  # doctest: +SKIP
    >>> train = tokenize_masked_lm(ds, tokenizer, masking="dynamic")  # rows unmasked, no labels  # doctest: +SKIP
    >>> Trainer(model, args, train, evaluation, data_collator=collator)  # doctest: +SKIP

    Called on a padded batch with a ``numpy.random.Generator``, it returns the batch with
    ``input_ids`` masked by :func:`mask_tokens` and their ``labels``; the tokenizer's special tokens
    (``all_special_ids``: ``[CLS]``, ``[SEP]``, ``[PAD]``...) and padding are never chosen, as
    transformers' collator chooses them when rows carry no ``special_tokens_mask``. Unlike
    transformers' collator it does not pad: the Trainer's :class:`~peftjax.training.Batcher` has.

    Args:
      tokenizer: a tokenizer with a mask token (``mask_token_id``, ``all_special_ids``, ``len``).
      mlm_probability, mask_replace_prob, random_replace_prob: as :func:`mask_tokens`.

    Raises:
      ValueError: a tokenizer without a mask token, or a probability out of range.
    """

    makes_labels = True  # the Trainer takes rows without labels and refuses rows with them

    def __init__(self, tokenizer, *, mlm_probability: float = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1):
        self.mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if self.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token: a masked LM's inputs need one")
        self.vocab_size = len(tokenizer)
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), np.int64)
        self.options = dict(mlm_probability=mlm_probability, mask_replace_prob=mask_replace_prob,
                            random_replace_prob=random_replace_prob)
        mask_tokens(np.zeros((1, 1), np.int64), 0, mask_token_id=self.mask_token_id,  # the options' checks
                    vocab_size=self.vocab_size, **self.options)

    def __call__(self, batch: dict, rng) -> dict:
        if "input_ids" not in batch:
            raise ValueError(f"DataCollatorForLanguageModeling: the batch has no input_ids (columns: {sorted(batch)})")
        ids = np.asarray(batch["input_ids"])
        inputs, labels = mask_tokens(ids, rng, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                                     special_tokens_mask=np.isin(ids, self.special_ids),
                                     attention_mask=batch.get("attention_mask"), **self.options)
        return {**batch, "input_ids": inputs, "labels": labels}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"DataCollatorForLanguageModeling(mask_token_id={self.mask_token_id}, {options})"
