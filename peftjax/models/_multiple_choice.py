"""Multiple choice (SWAG, RACE, CommonsenseQA): each of a row's choices is encoded as a sequence of
its own (the context paired with that choice) and scored by one logit; the row's logits are its
choices' scores, as transformers' ``...ForMultipleChoice`` classes compute them.

A family's class mixes :class:`MultipleChoice` in and defines ``choice_logits``, which scores
``[batch * choices, seq]`` rows; the mixin takes ``[batch, choices, seq]`` inputs, flattens them,
and shapes the scores ``[batch, choices]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.models._losses import masked_cross_entropy
from peftjax.models._outputs import ModelOutput


class MultipleChoice:
    """``__call__`` for a multiple-choice head (see the module docstring)."""

    def choice_logits(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                      dropout_rng) -> jax.Array:
        """One score per sequence, ``[rows]``, of ``[rows, seq]`` inputs."""
        raise NotImplementedError

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        dropout_rng=None,
    ) -> ModelOutput:
        """Scores each row's choices: inputs ``[batch, choices, seq]`` (``inputs_embeds``
        ``[batch, choices, seq, hidden]``), ``logits`` ``[batch, choices]``. ``labels`` (``[batch]``,
        the right choice's index; -100 leaves a row out) add transformers' loss, the mean cross
        entropy of the rows' choices. A choice whose ``attention_mask`` is all zeros (the padding
        the ``Batcher`` gives a row with fewer choices than the batch) gets the lowest logit,
        so it takes no probability and no loss.

        Raises:
          ValueError: inputs that are not ``[batch, choices, seq]``, naming their shape.
        """
        given = input_ids if input_ids is not None else inputs_embeds
        if given is None:
            raise ValueError(f"{type(self).__name__} needs input_ids or inputs_embeds")
        shape = jnp.shape(given)
        dims = 3 if input_ids is not None else 4
        if len(shape) != dims:
            what = "input_ids [batch, choices, seq]" if dims == 3 else "inputs_embeds [batch, choices, seq, hidden]"
            raise ValueError(f"{type(self).__name__} takes {what}: each row's choices as sequences of their own; "
                             f"got shape {tuple(shape)}")
        rows, choices = shape[0], shape[1]

        def flat(x):
            return None if x is None else jnp.asarray(x).reshape(rows * choices, *jnp.shape(x)[2:])

        scores = self.choice_logits(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids),
                                    flat(inputs_embeds), dropout_rng)
        logits = scores.reshape(rows, choices)
        if attention_mask is not None:  # a row with fewer choices than the batch: its padded ones score -inf
            present = jnp.any(jnp.asarray(attention_mask).reshape(rows, choices, -1) != 0, axis=-1)
            logits = jnp.where(present, logits, jnp.finfo(logits.dtype).min)
        loss = None if labels is None else masked_cross_entropy(logits, jnp.asarray(labels))
        return ModelOutput(logits=logits, loss=loss)
