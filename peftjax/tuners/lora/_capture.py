"""The inputs (or outputs) of chosen layers during a jitted forward pass: what EVA, CorDA and Astra
calibrate on.

PEFT registers torch forward hooks; here each chosen layer's class is swapped, for the length of
one traced call, to a subclass whose ``__call__`` hands its input to a reducer before running the
layer. The reduced values leave the jitted function as outputs, so the model is untouched and one
compilation serves every batch of a shape.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from peftjax.nn._positions import every_position
from peftjax.tuners.base import named_modules


def encoder_decoder(model) -> bool:
    """Whether ``model`` is an encoder-decoder (T5): its batch's ``attention_mask`` and per-token
    ``labels`` describe different tokens (the encoder's, the decoder's)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def refuse_decoder_layers(model, names: Iterable[str], method: str) -> None:
    """Calibration reads a layer's inputs at the positions the batch's masks keep: on an
    encoder-decoder those are the encoder's tokens, while its decoder's layers run on the
    decoder's (or, for cross-attention keys and values, the encoder's): no mask says which, so
    they are refused, named, rather than read at the wrong positions (PEFT's hooks index them
    with the encoder's mask)."""
    if not encoder_decoder(model):
        return
    decoder = [n for n in names if n.split(".")[0] == "decoder"]
    if decoder:
        raise ValueError(f"{method} on an encoder-decoder reads each layer's inputs at the tokens the batch's "
                         f"attention_mask keeps, the encoder's; {decoder[0]} (and {len(decoder) - 1} more decoder "
                         "layers) run on the decoder's tokens, where no mask of the batch applies: target the "
                         "encoder's layers (target_modules=r\"encoder\\..*\\.(q|v)\")")


def forward_fn_dict(model, batch: Mapping[str, Any]):
    """PEFT's default ``forward_fn``: ``model(**batch)``."""
    return model(**batch)


@contextlib.contextmanager
def _recording(modules: Mapping[str, nnx.Module], sink: dict[str, list], reduce: Callable, batch, order: list,
               outputs: bool = False):
    """Swaps each module's class to one that appends ``reduce(input, batch)`` (``outputs``: its
    output's) to ``sink[name]``; ``order`` gets each name at its first call (at trace time)."""
    swapped = []
    try:
        for name, module in modules.items():
            cls = type(module)

            def call(self, x, *args, _cls=cls, _name=name, **kwargs):
                if _name not in order:
                    order.append(_name)
                if not outputs:
                    sink.setdefault(_name, []).append(reduce(x, batch))
                y = _cls.__call__(self, x, *args, **kwargs)
                if outputs:
                    sink.setdefault(_name, []).append(reduce(y, batch))
                return y

            module.__class__ = type(f"Recording{cls.__name__}", (cls,), {"__slots__": (), "__call__": call,
                                                                          "__module__": cls.__module__})
            swapped.append((module, cls))
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


@functools.partial(nnx.jit, static_argnums=(2, 3, 4, 5))
def _run(model, batch, names: tuple[str, ...], reduce: Callable, forward_fn: Callable, outputs: bool):
    """One forward pass recording ``reduce(input or output, batch)`` per call of each named layer;
    jitted once per model structure, batch shape, names, reducer, forward function and side."""
    modules = named_modules(model)
    sink: dict[str, list] = {}
    with (_recording({n: modules[n] for n in names}, sink, reduce, batch, _ORDER.setdefault(names, []), outputs),
          every_position()):  # a classifier's last layer too, as PEFT's hooks see it
        forward_fn(model, batch)
    return sink


# the first-call order of each tuple of names, noted while tracing (a cache, like jit's own)
_ORDER: dict[tuple[str, ...], list[str]] = {}


def make_capture(model: nnx.Module, names: Iterable[str], reduce: Callable,
                 forward_fn: Callable = forward_fn_dict, *, outputs: bool = False) -> Callable:
    """A jitted ``batch -> {name: [reduce(input, batch) per call]}`` over ``model`` (host arrays);
    with ``outputs``, each call's output instead of its input.

    The returned function's ``order`` lists the names in the order the forward first calls them,
    once it has run: PEFT's hooks see torch's module order, which for a transformer is the call
    order, while NNX lists modules alphabetically.

    Args:
      model: the NNX model (its weights are read, never changed).
      names: module paths (``named_modules``) whose inputs to reduce.
      reduce: ``(input, batch) -> pytree of arrays``, traced inside the jitted function; a
        module-level function, so that the compilation is reused.
      forward_fn: ``(model, batch) -> anything``; runs the model on one batch.
    """
    names = tuple(names)

    def capture(batch):
        sink = _run(model, batch, names, reduce, forward_fn, outputs)
        return {n: jax.tree.map(np.asarray, v) for n, v in sink.items()}

    capture.order = _ORDER.setdefault(names, [])
    return capture
