"""Whether a forward pass must compute every position of every layer.

A sequence classifier reads one position of its last layer: BERT's pooler reads each sequence's
``[CLS]`` token. peftjax's classifiers therefore compute that layer's queries, attention output
and feed-forward block for those rows only (keys and values for every token, which the kept rows
attend to): the same logits for a sixth less work on a six-layer model. What watches a layer's
inputs rather than the model's outputs, the calibration of EVA and CorDA (PEFT's forward hooks),
must see every position, as it would in PyTorch; it runs the model inside :func:`every_position`.
"""

from __future__ import annotations

from peftjax.nn._flags import TraceFlag

_flag = TraceFlag()


def every_position():
    """Inside the block (while a forward pass is traced or run), models compute every position of
    every layer, even where their outputs read only some."""
    return _flag.raised()


def every_position_required() -> bool:
    """True inside :func:`every_position`."""
    return _flag.is_raised()
