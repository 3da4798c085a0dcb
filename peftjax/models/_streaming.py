"""Handing ``generate``'s tokens to a streamer while the compiled loop makes them.

A streamer is what transformers' ``generate(..., streamer=...)`` takes (its ``BaseStreamer``:
``TextStreamer``, ``TextIteratorStreamer``, or any object with ``put(token_ids)`` and ``end()``).
It gets the prompt's ids (``[rows, length]``) first, then each step's tokens (``[rows]``, the pad
token in rows that have ended) as the step runs, then ``end()``, as transformers calls it. Inside
the jitted loop each step's tokens leave the device by an ordered ``io_callback``; the loop takes
the streamer's registry key as an array, so one compiled loop serves every streamer (and the
loop without one has no callback at all).
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback


_STREAMERS: dict[int, object] = {}
_KEYS = itertools.count()
_LOCK = threading.Lock()


def check_streamer(streamer, *, num_beams: int) -> None:
    """Refuses what cannot stream: an object without ``put`` and ``end``, or beam search."""
    if streamer is None:
        return
    if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put(token_ids) and end() (transformers' BaseStreamer), got "
                        f"{type(streamer).__name__}")
    if num_beams > 1:
        raise ValueError(f"a streamer cannot follow beam search (num_beams={num_beams}): a beam's tokens change as "
                         "the beams are reordered; transformers refuses it too. Use num_beams=1")


@contextlib.contextmanager
def streaming(streamer, prompt):
    """Registers ``streamer`` for one generation: puts ``prompt`` (``[rows, length]`` ids) and yields
    the key the loop passes to :func:`put_tokens` (``None`` without a streamer); calls ``end()``
    after, also when generation fails, so a reader waiting on the streamer is released. The body
    must wait for the loop's results before it leaves (its callbacks run while it computes)."""
    if streamer is None:
        yield None
        return
    with _LOCK:
        key = next(_KEYS) % (2**31 - 1)
        _STREAMERS[key] = streamer
    try:
        streamer.put(np.asarray(prompt, np.int64))
        yield jnp.int32(key)
    finally:
        with _LOCK:
            _STREAMERS.pop(key, None)
        streamer.end()


def put_tokens(stream, tokens: jax.Array) -> None:
    """Inside the loop: hands ``tokens`` (``[rows]``) to the streamer ``stream`` names (``None``:
    no streamer, nothing traced)."""
    if stream is not None:
        io_callback(_put, None, stream, tokens, ordered=True)


def _put(key, tokens) -> None:
    with _LOCK:
        streamer = _STREAMERS.get(int(key))
    if streamer is not None:
        streamer.put(np.asarray(tokens, np.int64))
