"""Model outputs: pytrees with the attribute names transformers uses."""

from __future__ import annotations

from typing import Any

import flax.struct


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
    """

    logits: Any = None
    loss: Any = None
    last_hidden_state: Any = None
    pooler_output: Any = None
    past_key_values: Any = None
    aux_loss: Any = None
    router_logits: Any = None
    encoder_last_hidden_state: Any = None

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)
