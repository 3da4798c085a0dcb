"""Activated LoRA (aLoRA): an adapter that switches on at its invocation tokens.

PEFT's ``PeftModelForCausalLM`` finds, in each row of ``input_ids``, the last occurrence of the
adapter's ``alora_invocation_tokens`` and hands every LoRA layer its distance from the end
(``alora_offsets``); a layer adds the adapter to the last ``offset`` positions of its input only,
and to every position of a decoding step (a row without the tokens: nowhere). Here the model's
class gains a ``__call__`` (and ``generate``) that computes the offsets as a traced function of
``input_ids`` (so jitted train steps compute them from their batch) and makes them current while
the model runs (:func:`current_offsets`); ``generate`` computes them once from the prompts and
keeps them for its decoding steps, as PEFT does. ``unload`` restores the class.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._generation import rows_per_input
from peftjax.tuners.base import CallValue, ModelMixin, mixin_subclass, original_class, with_base_signature

_OFFSETS = CallValue("peftjax_alora_offsets")


def current_offsets() -> dict | None:
    """The running call's ``{invocation tokens: offsets [batch]}`` (``None`` outside a call)."""
    return _OFFSETS.get()


def invocation_offsets(input_ids, tokens: Sequence[int]):
    """Each row's distance from the start of the last occurrence of ``tokens`` to its end (PEFT's
    ``calculate_alora_offsets``), 0 where they do not occur: ``[batch]`` int32. Traceable (a batch
    under ``jit``); NumPy in, NumPy out."""
    xp = np if isinstance(input_ids, np.ndarray) else jnp
    ids = input_ids if input_ids.ndim == 2 else input_ids[None]
    n, length = len(tokens), ids.shape[1]
    if n > length:
        return xp.zeros((ids.shape[0],), xp.int32)
    starts = length - n + 1
    match = xp.ones((ids.shape[0], starts), bool)
    for j, t in enumerate(tokens):
        match = match & (ids[:, j:j + starts] == t)
    last = xp.max(xp.where(match, xp.arange(starts)[None, :], -1), axis=1)
    return xp.where(last >= 0, length - last, 0).astype(xp.int32)


def activation_mask(offsets: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``[batch, tokens]`` (or ``[batch]`` for a 2-D input): True on each row's last ``offset``
    positions, PEFT's mask (a decoding step's one token: True where the prompt had the tokens)."""
    tokens = shape[1] if len(shape) == 3 else 1
    mask = jnp.arange(tokens)[None, :] >= (tokens - jnp.minimum(offsets, tokens))[:, None]
    return mask if len(shape) == 3 else mask[:, 0]


class AloraModel(ModelMixin):
    """Mixin for a causal LM with aLoRA adapters: its calls compute the rows' offsets."""

    def __call__(self, *args, **kwargs):
        stored = getattr(self, "peft_generate_alora_offsets", None)
        if stored is not None:  # inside generate: the prompts' offsets, for the prefill and every step
            offsets = dict(zip(self.alora_invocations, stored.get_value()))
        else:
            if kwargs.get("segment_ids") is not None:  # the offsets count from each row's end
                raise ValueError(f"{type(self).__name__}: an aLoRA adapter switches on at its invocation tokens in "
                                 "each row; packed rows (segment_ids) hold several sequences: pass them unpacked")
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:  # PEFT warns and runs the base; a training run would then learn nothing
                raise ValueError(f"{type(self).__name__}: an aLoRA adapter finds its invocation tokens in input_ids; "
                                 "this call has none (inputs_embeds alone): pass input_ids")
            ids = ids if isinstance(ids, jax.Array) else np.asarray(ids)
            offsets = {tokens: invocation_offsets(ids, tokens) for tokens in self.alora_invocations}
        with _OFFSETS.during(offsets):
            return self._peftjax_base.__call__(self, *args, **kwargs)

    def generate(self, *args, **kwargs):
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:  # PEFT's message
            raise ValueError("Beam search not yet supported for aLoRA.")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError(f"{type(self).__name__}.generate: an aLoRA adapter finds its invocation tokens in the "
                             "prompt's input_ids; pass input_ids")
        ids = np.asarray(ids)
        ids = ids if ids.ndim == 2 else ids[None]
        offsets = np.stack([invocation_offsets(ids, tokens) for tokens in self.alora_invocations])
        offsets = np.repeat(offsets, rows_per_input(self, kwargs), axis=1)  # each returned sequence's row
        self.peft_generate_alora_offsets = nnx.Variable(jnp.asarray(offsets))
        try:
            return self._peftjax_base.generate(self, *args, **kwargs)
        finally:
            del self.peft_generate_alora_offsets


def take_alora(model: nnx.Module, tokens: tuple[int, ...]) -> None:
    """Makes ``model`` compute aLoRA offsets for ``tokens`` in its calls (the class keeps its name
    and call signature); several adapters' tokens add up.

    Raises:
      TypeError: the model cannot generate (aLoRA is for causal LMs), or its class was swapped by
        another method's model-level adapter (prompt learning, Poly's tasks).
    """
    check_alora_model(model)
    if not isinstance(model, AloraModel):
        model.__class__ = with_base_signature(mixin_subclass(type(model), AloraModel, ""), AloraModel.__call__)
    model.alora_invocations = tuple(sorted({*getattr(model, "alora_invocations", ()), tuple(tokens)}))


def check_alora_model(model: nnx.Module) -> None:
    """Raises :func:`take_alora`'s ``TypeError`` without changing anything."""
    if isinstance(model, AloraModel):
        return
    if not hasattr(type(model), "generate") or "input_ids" not in inspect.signature(type(model).__call__).parameters:
        raise TypeError(f"aLoRA (alora_invocation_tokens) is for causal LMs (task_type='CAUSAL_LM'); "
                        f"{type(model).__name__} is not one")
    if original_class(model) is not type(model):
        raise TypeError(f"aLoRA cannot be added to {type(model).__name__}: the model carries another method's "
                        "model-level adapter (prompt learning, Poly's task ids)")
