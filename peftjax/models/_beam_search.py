"""Beam search, as transformers' ``generate`` runs it (``num_beams > 1``), and beam sampling
(with ``do_sample``).

The algorithm is transformers' vectorised one (``GenerationMixin._beam_search``), on static
shapes so that it compiles into one loop: each batch item keeps ``num_beams`` running hypotheses
and ``num_beams`` finished ones. A step adds each running hypothesis's next-token log
probabilities (after the logits processors: repetition penalty, minimum length) to its score and
keeps the ``K = max(2, 1 + n_eos) * num_beams`` best continuations of the item (beam sampling
draws them instead, without replacement, in proportion to the exponentiated scores, and orders
them by score); those that end
(an EOS token, a stop string, or the last allowed step) may enter the finished set, scored by their sum divided
by ``length ** length_penalty``, and the best ``num_beams`` that do not end run on. The loop stops
when no item can improve its finished set (``early_stopping``: ``True`` once an item has
``num_beams`` finished, ``False`` by transformers' heuristic from the current length, ``"never"``
from the longest length when ``length_penalty > 0``), or at ``max_new_tokens``.

The functions here are the bookkeeping; the model call and its cache stay with the caller
(:mod:`peftjax.models._generation` for decoders, :mod:`peftjax.models._seq2seq_generation` for
encoder-decoders), which reorders its cache rows by the parents :func:`step` returns.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1.0e9  # transformers' "very large negative" score, added (not set) as it adds it


class Beams(NamedTuple):
    """The state of a beam search over ``batch`` items, ``num_beams`` hypotheses each, up to
    ``steps`` generated tokens (fill value past a hypothesis's end)."""

    running: jax.Array  # [batch, beams, steps] the running hypotheses' tokens
    running_scores: jax.Array  # [batch, beams] their summed log probabilities
    finished: jax.Array  # [batch, beams, steps] the best finished hypotheses' tokens
    finished_scores: jax.Array  # [batch, beams] their length-penalised scores, best first
    finished_lengths: jax.Array  # [batch, beams] their generated lengths
    is_finished: jax.Array  # [batch, beams] whether a slot holds a finished hypothesis
    improvable: jax.Array  # [batch, 1] whether the item's finished set may still improve


def init(batch: int, num_beams: int, steps: int, fill: int) -> Beams:
    """The state before the first token: only beam 0 of each item is live (the others score -1e9,
    so the first step does not pick the same token from identical beams)."""
    tokens = jnp.full((batch, num_beams, steps), fill, jnp.int32)
    running_scores = jnp.zeros((batch, num_beams), jnp.float32).at[:, 1:].set(_NEG)
    return Beams(tokens, running_scores, tokens, jnp.full((batch, num_beams), _NEG, jnp.float32),
                 jnp.zeros((batch, num_beams), jnp.int32), jnp.zeros((batch, num_beams), bool),
                 jnp.ones((batch, 1), bool))


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[b, index[b, j], ...]``: the beams ``index`` ([batch, n]) picks of each item."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def step(beams: Beams, log_probs: jax.Array, i, *, eos: tuple[int, ...], max_new_tokens: int, length_penalty,
         early_stopping, key=None, stops=None) -> tuple[Beams, jax.Array, jax.Array, jax.Array]:
    """One token of every running hypothesis.

    Args:
      beams: the state after ``i`` tokens.
      log_probs: ``[batch * beams, vocab]`` the running hypotheses' next-token log probabilities,
        after the logits processors (rows item-major, as :func:`init`'s beams).
      i: the step (traced), 0 for the first generated token.
      eos: the stop tokens (static; their number sets how many continuations are kept).
      max_new_tokens: the last step is ``max_new_tokens - 1``: every continuation ends there.
      length_penalty: the exponent of the length a finished score is divided by (a value).
      early_stopping: ``True``, ``False`` or ``"never"`` (static), as transformers'.
      key: beam sampling's key (``None``: beam search).
      stops: ``None``, or which continuations end in a stop string: a function of their parent
        beams and tokens (each ``[batch, K]``) giving ``[batch, K]`` (transformers applies its
        stopping criteria to every continuation kept, as to an EOS token).

    Returns:
      ``(beams, parents, tokens, going)``: the state after ``i + 1`` tokens; for each new running
      row (``[batch * beams]``, item-major) the row it continues and the token it added; and
      whether the search goes on (transformers' loop condition, over the whole batch).
    """
    batch, num_beams, _ = beams.running.shape
    vocab = log_probs.shape[-1]
    keep = max(2, 1 + len(eos)) * num_beams
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
    scores = log_probs.reshape(batch, num_beams, vocab) + beams.running_scores[:, :, None]
    scores = scores.reshape(batch, num_beams * vocab)
    if key is None:
        top_scores, top_index = jax.lax.top_k(scores, keep)
    else:  # transformers' multinomial draw without replacement, as the Gumbel top-k trick draws it
        drawn = jax.lax.top_k(scores + jax.random.gumbel(key, scores.shape, scores.dtype), keep)[1]
        top_scores = jnp.take_along_axis(scores, drawn, axis=1)
        order = jnp.argsort(-top_scores, axis=1)  # then best first, as transformers sorts them
        top_scores = jnp.take_along_axis(top_scores, order, axis=1)
        top_index = jnp.take_along_axis(drawn, order, axis=1)
    top_parent, top_token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    top_running = _gather(beams.running, top_parent).at[:, :, i].set(top_token)
    # a continuation ends with an EOS token, or on the last step (transformers' max-length criterion)
    ends = jnp.isin(top_token, eos_ids) | (i + 1 >= max_new_tokens)
    if stops is not None:
        ends = ends | stops(top_parent, top_token)

    # the best `num_beams` continuations that do not end run on
    live_scores = top_scores + ends.astype(jnp.float32) * _NEG
    pick = jax.lax.top_k(live_scores, num_beams)[1]
    running = _gather(top_running, pick)
    running_scores = _gather(live_scores, pick)
    parents = (_gather(top_parent, pick) + jnp.arange(batch)[:, None] * num_beams).reshape(-1)

    # the first `num_beams` continuations that end may enter the finished set
    ended = ends & (jnp.arange(keep) < num_beams)[None, :]
    penalised = top_scores / ((i + 1).astype(jnp.float32) ** length_penalty)
    full = jnp.all(beams.is_finished, axis=-1, keepdims=True) & (early_stopping is True)
    penalised = penalised + full.astype(jnp.float32) * _NEG
    penalised = penalised + (~beams.improvable).astype(jnp.float32) * _NEG
    penalised = penalised + (~ended).astype(jnp.float32) * _NEG
    merged_scores = jnp.concatenate([beams.finished_scores, penalised], axis=1)
    best = jax.lax.top_k(merged_scores, num_beams)[1]
    finished = _gather(jnp.concatenate([beams.finished, top_running], axis=1), best)
    finished_scores = _gather(merged_scores, best)
    lengths = jnp.concatenate([beams.finished_lengths, jnp.full((batch, keep), i + 1, jnp.int32)], axis=1)
    finished_lengths = _gather(lengths, best)
    is_finished = _gather(jnp.concatenate([beams.is_finished, ended], axis=1), best)

    # can a running hypothesis still beat the worst finished one? (transformers' heuristic)
    best_length = (i + 1).astype(jnp.float32)
    if early_stopping == "never":  # a positive penalty favours length: the longest possible
        best_length = jnp.where(length_penalty > 0.0, jnp.float32(max_new_tokens), best_length)
    best_possible = running_scores[:, :1] / best_length**length_penalty
    worst = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), _NEG)
    improvable = beams.improvable & jnp.any(best_possible > worst, axis=-1, keepdims=True)

    going = (jnp.any(improvable) & ~(jnp.all(is_finished) & (early_stopping is True)) & ~jnp.all(ends))
    new = Beams(running, running_scores, finished, finished_scores, finished_lengths, is_finished, improvable)
    return new, parents, running[:, :, i].reshape(-1), going


def best(beams: Beams, num_return_sequences: int) -> tuple[jax.Array, jax.Array]:
    """The ``num_return_sequences`` best finished hypotheses of each item, best first:
    ``[batch * n, steps]`` tokens and ``[batch * n]`` generated lengths."""
    n = num_return_sequences
    tokens = beams.finished[:, :n].reshape(-1, beams.finished.shape[-1])
    return tokens, beams.finished_lengths[:, :n].reshape(-1)
