"""Model outputs: pytrees with the attribute names transformers uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class ModelOutput:
    """What a peftjax model returns; fields a model does not produce stay ``None``.

    Attributes:
      logits: prediction scores, ``[batch, seq, vocab]`` or ``[batch, num_labels]``.
      loss: the scalar loss when ``labels`` were given.
      last_hidden_state: the final hidden states ``[batch, seq, hidden]``.
      pooler_output: BERT's pooled ``[CLS]`` representation.
      past_key_values: the updated KV cache when one was passed in.
      aux_loss: a mixture of experts' load-balancing loss (Mixtral, with ``output_router_logits``).
      router_logits: a mixture of experts' router logits, a tuple of one ``[batch * seq, experts]``
        array per layer (Mixtral, with ``output_router_logits``).
      encoder_last_hidden_state: an encoder-decoder model's encoder output ``[batch, seq, hidden]``.
      start_logits: a question-answering model's score of each token as its answer's start
        ``[batch, seq]``.
      end_logits: ... and as its answer's end ``[batch, seq]``.
    """

    logits: Any = None
    loss: Any = None
    last_hidden_state: Any = None
    pooler_output: Any = None
    past_key_values: Any = None
    aux_loss: Any = None
    router_logits: Any = None
    encoder_last_hidden_state: Any = None
    start_logits: Any = None
    end_logits: Any = None

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


def kept_positions(hidden: jax.Array, logits_to_keep: int | Sequence[int] | jax.Array, labels=None) -> jax.Array:
    """The hidden states ``[batch, seq, hidden]`` a causal LM's head projects: transformers'
    ``logits_to_keep``.

    ``0`` keeps every position; an int ``n > 0`` the last ``n`` (``generate``'s prefill needs only
    the last, and the head over a long prompt would cost a ``[batch, seq, vocab]`` array); a 1-D
    sequence of indices those positions, in that order.

    Raises:
      ValueError: ``logits_to_keep`` is negative, not an int or 1-D indices, or set together with
        ``labels`` (the loss reads every position's logits).
    """
    if not isinstance(logits_to_keep, (int, bool, np.integer)) and np.ndim(logits_to_keep) == 0:
        if isinstance(logits_to_keep, jax.core.Tracer):  # the kept count sets the logits' shape
            raise ValueError("logits_to_keep must be known while tracing: pass a Python int, not a traced array")
        if jnp.issubdtype(jnp.result_type(logits_to_keep), jnp.integer):
            logits_to_keep = int(logits_to_keep)
    if isinstance(logits_to_keep, (int, np.integer)) and not isinstance(logits_to_keep, bool):
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position), got {logits_to_keep}")
        if logits_to_keep == 0:
            return hidden
        index = slice(-int(logits_to_keep), None)
    else:
        index = jnp.asarray(logits_to_keep)
        if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
            raise ValueError(
                f"logits_to_keep must be an int or 1-D integer indices, got {type(logits_to_keep).__name__} "
                f"of shape {index.shape} and dtype {index.dtype}"
            )
    if labels is not None:
        raise ValueError("logits_to_keep keeps only some positions' logits, but labels need every position's for "
                         "the loss: pass logits_to_keep=0 (the default) with labels")
    return hidden[:, index]
