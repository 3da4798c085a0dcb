"""What ``generate`` does to the next token's logits before choosing it: transformers' sampling
warpers (temperature, top-H, top-k, top-p, min-p, typical, epsilon and eta sampling) and the logits
processors that ban, bias or force tokens (bad words, sequence biases, suppressed tokens, a forced
first or last token, the exponentially decaying length penalty), each as transformers computes it.

The warpers' values are arrays (a compiled ``generate`` serves every value; only turning one on
or off compiles anew). The token rules are static (:class:`Rules`: their token ids fix the
program), read from ``generate``'s arguments or else the checkpoint's ``generation_config.json``
by :func:`rules_arguments`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- sampling warpers


def filter_logits(logits: jax.Array, temperature, top_k=None, top_p=None, min_p=None, typical_p=None,
                  epsilon=None, eta=None, top_h=None, *, min_keep: int = 1) -> jax.Array:
    """Temperature, then top-H, top-k, top-p, min-p, typical, epsilon and eta filtering, in the
    order transformers' ``generate`` applies its warpers; ``None`` turns a filter off.

    The settings are values, not shapes: each may be a traced scalar. The k-th largest logit is
    read from the sorted row (the value ``lax.top_k`` would give, which needs a static ``k``), and
    a row keeps every logit equal to it, as transformers' ``TopKLogitsWarper``. Each filter keeps
    at least the ``min_keep`` likeliest tokens (transformers' ``min_tokens_to_keep``: 1, and one
    more than the EOS ids for beam sampling), top-H the likeliest one, as there.
    """
    neg = jnp.finfo(logits.dtype).min
    logits = logits / temperature
    if top_h is not None:
        logits = _top_h(logits, top_h, neg)
    if top_k is not None or top_p is not None:
        logits = _top_k_top_p(logits, top_k, top_p, neg, min_keep)
    if min_p is not None:  # MinPLogitsWarper: below min_p times the likeliest token's probability
        probs = jax.nn.softmax(logits, axis=-1)
        cut = (probs < min_p * probs.max(axis=-1, keepdims=True)) & (probs < _kth_largest(probs, min_keep))
        logits = jnp.where(cut, neg, logits)
    if typical_p is not None:
        logits = _typical(logits, typical_p, neg, min_keep)
    if epsilon is not None:  # EpsilonLogitsWarper: below a fixed probability
        logits = _cut_below(logits, epsilon, neg, min_keep)
    if eta is not None:  # EtaLogitsWarper: below min(eta, sqrt(eta) * exp(-entropy))
        cut = jnp.minimum(eta, jnp.sqrt(eta) * jnp.exp(-_entropy(logits)))
        logits = _cut_below(logits, cut[:, None], neg, min_keep)
    return logits


# filter_logits' settings, as decoding_arguments returns them: what beam sampling passes on
SAMPLING_FILTERS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "top_h")


def _kth_largest(x, k: int):
    """Each row's ``k``-th largest value, ``[rows, 1]``."""
    return jax.lax.top_k(x, k)[0][:, k - 1:k]


def _top_k_top_p(logits, top_k, top_p, neg, min_keep: int = 1):
    # one sort serves both filters: top-k's cut leaves the kept logits in their sorted order and
    # the cut ones, all equal to ``neg``, in front of them, which is what sorting the cut row gives
    order = None if top_p is None else jnp.argsort(logits, axis=-1)  # ascending, as TopPLogitsWarper
    sorted_logits = jnp.sort(logits, axis=-1) if order is None else jnp.take_along_axis(logits, order, axis=-1)
    if top_k is not None:
        vocab = logits.shape[-1]
        k = jnp.clip(jnp.maximum(jnp.asarray(top_k, jnp.int32), min_keep), 1, vocab)
        kth = jax.lax.dynamic_slice_in_dim(sorted_logits, vocab - k, 1, axis=-1)
        logits = jnp.where(logits < kth, neg, logits)
        sorted_logits = jnp.where(sorted_logits < kth, neg, sorted_logits)
    if top_p is not None:
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted = remove_sorted.at[..., -min_keep:].set(False)  # keep at least min_keep tokens
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return logits


def _top_h(logits, top_h, neg, top_n: int = 100):
    """transformers' ``TopHLogitsWarper``: of the ``top_n`` likeliest tokens (renormalised among
    themselves), the likeliest first until their summed entropy terms pass ``top_h`` times the
    entropy, the first always."""
    top_n = min(top_n, logits.shape[-1])
    top_logits, top_index = jax.lax.top_k(logits, top_n)
    probs = jax.nn.softmax(top_logits, axis=-1)
    # -p log p as transformers computes it: a token of probability 0 makes the rest NaN, not kept
    cumulative = jnp.cumsum(-probs * jnp.log(probs), axis=-1)
    selected = (cumulative <= top_h * _entropy(top_logits)[:, None]).at[:, 0].set(True)
    keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], top_index].set(selected)
    return jnp.where(keep, logits, neg)


def _entropy(logits):
    """Each row's entropy in nats; a filtered-out token (probability 0) adds nothing."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


def _typical(logits, mass, neg, min_keep: int = 1):
    """transformers' ``TypicalLogitsWarper``: tokens ordered by how far their surprisal lies from
    the entropy, kept until their probabilities add up to ``mass`` (the one that crosses it too),
    the ``min_keep`` nearest at least."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    distance = jnp.abs(-log_probs - _entropy(logits)[:, None])
    order = jnp.argsort(distance, axis=-1)
    sorted_distance = jnp.take_along_axis(distance, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    last = jnp.minimum(jnp.sum(cum < mass, axis=-1), logits.shape[-1] - 1)
    # the token at ``last`` bounds the distance kept (at least the ``min_keep``-th nearest's)
    last = jnp.maximum(last, min_keep - 1)
    bound = jnp.take_along_axis(sorted_distance, last[:, None], axis=-1)
    return jnp.where(distance > bound, neg, logits)


def _cut_below(logits, cut, neg, min_keep: int = 1):
    """Tokens whose probability is below ``cut``, except the ``min_keep`` likeliest, filtered out."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where((probs < cut) & (logits < _kth_largest(logits, min_keep)), neg, logits)


WARPERS = {  # generate's argument: (generation config's value that turns it off, the valid range)
    "min_p": (0.0, "in [0, 1]"), "typical_p": (1.0, "in (0, 1]"), "epsilon_cutoff": (0.0, "in [0, 1)"),
    "eta_cutoff": (0.0, "in [0, 1)"), "top_h": (None, "in (0, 1]"),
}


def warper_arguments(settings: dict, defaults) -> dict:
    """min-p, typical, epsilon and eta sampling's values (``settings``' where not ``None``, else
    ``defaults``', the generation config's) as :func:`filter_logits`' keyword arguments: an array
    each, or ``None`` where off (transformers' defaults: all off).

    Raises:
      ValueError: a value out of its range (named).
    """
    out = {}
    for name, (off, valid) in WARPERS.items():
        value = settings.get(name)
        value = defaults.get(name) if value is None else value
        if value is None:
            out[name] = None
            continue
        ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
        ok = ok and {"min_p": 0 <= value <= 1, "typical_p": 0 < value <= 1, "top_h": 0 < value <= 1}.get(
            name, 0 <= value < 1)
        if not ok:
            raise ValueError(f"{name} must be a number {valid} ({off}: off), got {value!r}")
        out[name] = None if value == off else np.float32(value)
    return {"min_p": out["min_p"], "typical_p": out["typical_p"], "epsilon": out["epsilon_cutoff"],
            "eta": out["eta_cutoff"], "top_h": out["top_h"]}


# ----------------------------------------------------------------------------- token rules


class Rules(NamedTuple):
    """The logits processors that ban, bias or force tokens, as static settings (hashable: part of
    the compiled program). Steps count the new tokens (0: the first generated).

    Attributes:
      bias: ``((token ids, value), ...)``, transformers' ``sequence_bias``: ``value`` is added to
        the last token's logit where the sequence so far ends in the others.
      bad: ``(token ids, ...)``, ``bad_words_ids``: that last token is banned instead.
      suppress: token ids banned at every step (``suppress_tokens``).
      begin_suppress: token ids banned at step ``begin_at`` (``begin_suppress_tokens``).
      begin_at: the step ``begin_suppress`` applies to.
      forced_bos: the token forced at step 0 (``forced_bos_token_id``, where the sequence is then
        one token long, as transformers forces it), or ``None``.
      forced_eos: token ids, one of which is forced at step ``forced_eos_at`` (``forced_eos_token_id``).
      forced_eos_at: the last step (``max_new_tokens - 1``).
      decay: ``(start, factor, eos ids)``, ``exponential_decay_length_penalty``: after ``start`` new
        tokens the EOS logits grow by ``|logit| * (factor ** (step - start) - 1)``, or ``None``.
      source_penalty: ``encoder_repetition_penalty``: a token of the row's input (the encoder's, or
        a decoder's prompt) has its logit multiplied by it, or divided where negative; or ``None``.
      source_ngram: ``encoder_no_repeat_ngram_size``: no token that would complete an n-gram of the
        row's input; or ``None``.
      remove_invalid: ``remove_invalid_values``: NaN logits become 0 and infinite ones the largest
        finite values (after the forced tokens, before the length penalty, as transformers').
    """

    bias: tuple = ()
    bad: tuple = ()
    suppress: tuple = ()
    begin_suppress: tuple = ()
    begin_at: int = 0
    forced_bos: int | None = None
    forced_eos: tuple = ()
    forced_eos_at: int = -1
    decay: tuple | None = None
    source_penalty: float | None = None
    source_ngram: int | None = None
    remove_invalid: bool = False

    @property
    def reads_tokens(self) -> bool:
        """Whether a rule matches the sequence so far (a biased or banned sequence of several
        tokens, the input's n-grams)."""
        return (any(len(ids) > 1 for ids, _ in self.bias) or any(len(ids) > 1 for ids in self.bad)
                or self.source_ngram is not None)

    @property
    def reads_source(self) -> bool:
        """Whether a rule reads the rows' input ids (the encoder's, or a decoder's prompt)."""
        return self.source_penalty is not None or self.source_ngram is not None


RULES = ("sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
         "forced_eos_token_id", "exponential_decay_length_penalty", "encoder_repetition_penalty",
         "encoder_no_repeat_ngram_size", "remove_invalid_values")


def rules_arguments(settings: dict, defaults, *, vocab: int | None, eos: tuple, prompt_length: int,
                    max_new_tokens: int) -> Rules | None:
    """:class:`Rules` from ``generate``'s arguments (``settings``; ``None``: not given) or else the
    generation config's (``defaults``), checked as transformers checks them: ``None`` where none
    is set. ``eos`` are the stop ids in use (a bad word that is one is dropped, as transformers'
    ``NoBadWordsLogitsProcessor`` drops it; the length penalty raises them); ``prompt_length`` is
    the sequence's length before the first new token (a forced first token needs it to be 1).

    Raises:
      ValueError: a setting of the wrong form, or a token id outside the vocabulary (named).
    """
    values = {}
    for name in RULES:
        value = settings.get(name)
        values[name] = defaults.get(name) if value is None else value

    def ids(name, value, *, single=False) -> tuple[int, ...]:
        items = [value] if single or isinstance(value, (int, np.integer)) else value
        if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < (vocab or math.inf)
                for i in items):
            raise ValueError(f"{name} must be {'a token id' if single else 'token ids'} in [0, {vocab or 'inf'}) "
                             f"(the vocabulary), got {value!r}")
        return tuple(int(i) for i in items)

    def sequences(name, value) -> list:
        if not isinstance(value, (list, tuple)) or not value or not all(
                isinstance(s, (list, tuple)) and s for s in value):
            raise ValueError(f"{name} must be a non-empty list of non-empty lists of token ids, got {value!r}")
        return [ids(name, s) for s in value]

    bias = values["sequence_bias"]
    if bias is not None:
        pairs = list(bias.items()) if isinstance(bias, dict) else bias
        if not isinstance(pairs, (list, tuple)) or not pairs or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], (int, float))
                and not isinstance(p[1], bool) for p in pairs):
            raise ValueError("sequence_bias must map token-id sequences to biases: {(id, ...): bias} or "
                             f"[[[id, ...], bias], ...], got {bias!r}")
        keys = sequences("sequence_bias", [list(p[0]) if isinstance(p[0], (list, tuple)) else p[0] for p in pairs])
        merged: dict[tuple, float] = {}
        for key, (_, value) in zip(keys, pairs):
            merged[key] = float(value)  # a repeated sequence: the last bias, as a dict would keep it
        bias = tuple(merged.items())
    bad = values["bad_words_ids"]
    if bad is not None:
        stops = {(e,) for e in eos}
        bad = tuple(dict.fromkeys(s for s in sequences("bad_words_ids", bad) if s not in stops))
    suppress = values["suppress_tokens"]
    suppress = None if suppress is None else ids("suppress_tokens", suppress)
    begin = values["begin_suppress_tokens"]
    begin = None if begin is None else ids("begin_suppress_tokens", begin)
    bos = values["forced_bos_token_id"]
    bos = None if bos is None else ids("forced_bos_token_id", bos, single=True)[0]
    forced_eos = values["forced_eos_token_id"]
    forced_eos = None if forced_eos is None else ids("forced_eos_token_id", forced_eos)
    decay = values["exponential_decay_length_penalty"]
    if decay is not None:
        if (not isinstance(decay, (list, tuple)) or len(decay) != 2 or isinstance(decay[0], bool)
                or not isinstance(decay[0], (int, np.integer)) or decay[0] < 0
                or isinstance(decay[1], bool) or not isinstance(decay[1], (int, float))):
            raise ValueError("exponential_decay_length_penalty must be (start: an integer >= 0, factor: a number), "
                             f"got {decay!r}")
        decay = (int(decay[0]), float(decay[1]), tuple(dict.fromkeys(eos))) if eos else None
    source_penalty = values["encoder_repetition_penalty"]
    if source_penalty is not None:
        if isinstance(source_penalty, bool) or not isinstance(source_penalty, (int, float)) or not source_penalty > 0:
            raise ValueError(f"encoder_repetition_penalty must be > 0 (1: off), got {source_penalty!r}")
        source_penalty = None if source_penalty == 1 else float(source_penalty)
    source_ngram = values["encoder_no_repeat_ngram_size"]
    if source_ngram is not None:
        if isinstance(source_ngram, bool) or not isinstance(source_ngram, (int, np.integer)) or source_ngram < 0:
            raise ValueError(f"encoder_no_repeat_ngram_size must be an integer >= 0 (0: off), got {source_ngram!r}")
        source_ngram = int(source_ngram) or None
    remove_invalid = values["remove_invalid_values"]
    if remove_invalid is not None and not isinstance(remove_invalid, bool):
        raise ValueError(f"remove_invalid_values must be True or False, got {remove_invalid!r}")
    if all(v is None for v in (bias, bad, suppress, begin, bos, forced_eos, decay, source_penalty, source_ngram)) \
            and not remove_invalid:
        return None
    # transformers starts begin_suppress_tokens after a forced first token where it forces one
    return Rules(bias=bias or (), bad=bad or (), suppress=suppress or (), begin_suppress=begin or (),
                 begin_at=1 if prompt_length == 1 and bos is not None else 0,
                 forced_bos=bos if prompt_length == 1 else None, forced_eos=forced_eos or (),
                 forced_eos_at=max_new_tokens - 1, decay=decay, source_penalty=source_penalty,
                 source_ngram=source_ngram, remove_invalid=bool(remove_invalid))


def split_token_bias(rules: Rules | None, vocab: int | None) -> tuple[Rules | None, np.ndarray | None]:
    """``(rules, token_bias)``: ``sequence_bias``'s one-token entries taken out of ``rules`` as a
    float32 ``[vocab]`` vector, a value of the compiled loop (a new bias reuses the compiled
    ``generate``), and the rules left (``None`` where none is). A model whose vocabulary size is
    unknown keeps them in ``rules``."""
    if rules is None or vocab is None or not any(len(ids) == 1 for ids, _ in rules.bias):
        return rules, None
    vector = np.zeros(int(vocab), np.float32)
    for ids, value in rules.bias:
        if len(ids) == 1:
            vector[ids[0]] += np.float32(value)
    rest = rules._replace(bias=tuple((ids, value) for ids, value in rules.bias if len(ids) > 1))
    active = (rest.bias, rest.bad, rest.suppress, rest.begin_suppress, rest.forced_bos is not None, rest.forced_eos,
              rest.decay is not None, rest.source_penalty is not None, rest.source_ngram is not None,
              rest.remove_invalid)
    return (rest if any(active) else None), vector


def add_token_bias(logits, token_bias):
    """``logits`` plus the one-token ``sequence_bias`` vector (:func:`split_token_bias`) in every row.

    Raises:
      ValueError: (while tracing) the vector's length is not the logits' vocabulary.
    """
    if token_bias.shape[-1] != logits.shape[-1]:
        raise ValueError(f"sequence_bias: the model's logits have {logits.shape[-1]} entries, its config's vocab_size "
                         f"{token_bias.shape[-1]}; they must agree")
    return logits + token_bias[None].astype(logits.dtype)


def check_source_rules(rules: Rules | None, *, rows_per_input: int, has_input_ids: bool) -> None:
    """Refuses the input's rules where transformers' ``generate`` would not apply them as asked.

    Raises:
      ValueError: they are asked for without input ids (transformers skips them with a warning).
      NotImplementedError: ``encoder_repetition_penalty`` with several rows per input (beams or
        returned sequences): transformers' processor reads the inputs before they are repeated,
        and so penalises the first rows of the batch only.
    """
    if rules is None or not rules.reads_source:
        return
    if not has_input_ids:
        raise ValueError("encoder_repetition_penalty and encoder_no_repeat_ngram_size read the input's token ids; "
                         "pass input_ids, not inputs_embeds alone")
    if rules.source_penalty is not None and rows_per_input > 1:
        raise NotImplementedError(
            f"encoder_repetition_penalty with {rows_per_input} rows per input (beams or returned sequences) is not "
            "implemented: transformers applies it to the batch's first rows only; use one beam and one sequence")


def _tail_matches(tokens, length, prefix: tuple[int, ...]):
    """Whether each row's sequence (``tokens[:, :length]``) ends in ``prefix``."""
    n = len(prefix)
    if tokens.shape[1] < n:
        return jnp.zeros((tokens.shape[0],), bool)
    tail = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(length - n, 0), n, axis=1)
    return jnp.all(tail == jnp.asarray(prefix, tokens.dtype)[None], axis=1) & (length >= n)


def _add_sequence_bias(logits, pairs, tokens, length):
    """transformers' ``SequenceBiasLogitsProcessor``: a one-token sequence's bias always, a longer
    one's to its last token where the sequence so far ends in the rest (summed where several)."""
    single = np.zeros(logits.shape[-1], np.float32)
    for ids, value in pairs:
        if len(ids) == 1:
            single[ids[0]] += value
    logits = logits + jnp.asarray(single, logits.dtype)[None]
    for ids, value in pairs:
        if len(ids) > 1:
            hit = _tail_matches(tokens, length, ids[:-1])
            logits = logits.at[:, ids[-1]].add(jnp.where(hit, jnp.asarray(value, logits.dtype), 0))
    return logits


def mark_seen(seen, tokens: jax.Array, counted=None):
    """``seen`` (``[rows, vocab]``) with each row's ``tokens`` (``[rows, n]``, where ``counted``)
    marked; ``None`` stays ``None`` (no penalty reads it)."""
    if seen is None:
        return None
    if counted is not None:
        tokens = jnp.where(counted, tokens, seen.shape[-1])  # an index past the vocabulary: dropped
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, tokens].set(True, mode="drop")


def penalize(logits, seen, penalty):
    """transformers' repetition penalty: a ``seen`` token's logit divided by ``penalty``, or
    multiplied where negative."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def occurrence_arguments(presence_penalty, frequency_penalty):
    """``(presence, frequency)`` as float32 values of the compiled loop, or ``None`` where both are
    off (0 or ``None``).

    Raises:
      ValueError: a value that is not a finite number (named).
    """
    values = []
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        value = 0.0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number (0: off), got {value!r}")
        values.append(np.float32(value))
    return tuple(values) if any(values) else None


def penalize_occurrences(logits, occurrence, tokens, prompt: int, length):
    """peftjax's presence and frequency penalties (OpenAI's and vLLM's, not transformers'): with
    ``occurrence`` ``(presence, frequency)``, a token's logit less ``frequency`` times its count
    among each row's new tokens (the columns of ``tokens`` from ``prompt`` up to ``length``), and
    less ``presence`` once it is among them."""
    presence, frequency = occurrence
    columns = jnp.arange(tokens.shape[1])
    new = jnp.where(((columns >= prompt) & (columns < length))[None], tokens, logits.shape[-1])  # past it: dropped
    rows = jnp.arange(tokens.shape[0])[:, None]
    counts = jnp.zeros(logits.shape, jnp.float32).at[rows, new].add(1.0, mode="drop")
    penalty = frequency * counts + presence * (counts > 0)
    return (logits.astype(jnp.float32) - penalty).astype(logits.dtype)


def ban_ngram_completions(logits, grams, tokens, length, n: int, *, within=None):
    """-inf for every token that would complete an ``n``-gram of ``grams`` (``[rows, m]``; of its
    first ``within`` columns where given, traced) after the row's last ``n - 1`` tokens (of
    ``tokens[:, :length]``), once the row holds that many: transformers' n-gram blocking, of the
    row itself (``NoRepeatNGramLogitsProcessor``) or of its input (the encoder's)."""
    grams, tokens = jnp.asarray(grams), jnp.asarray(tokens)
    rows, width = grams.shape
    windows = width - n + 1
    if windows < 1 or tokens.shape[1] < n - 1:
        return logits
    last = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(length - (n - 1), 0), n - 1, axis=1)
    match = jnp.ones((1, windows), bool) if within is None else (jnp.arange(windows) + n - 1 < within)[None]
    for k in range(n - 1):
        match = match & (grams[:, k:k + windows] == last[:, k:k + 1])
    banned = jnp.where(match, grams[:, n - 1:n - 1 + windows], logits.shape[-1])  # past the vocabulary: none
    ban = jnp.zeros(logits.shape, bool).at[jnp.arange(rows)[:, None], banned].set(True, mode="drop")
    return jnp.where(ban & (length >= n - 1), -jnp.inf, logits)


def _token_mask(vocab: int, ids) -> np.ndarray:
    mask = np.zeros(vocab, bool)
    mask[list(ids)] = True
    return mask


def bias_sequences(logits, rules: Rules, tokens, length):
    """``sequence_bias``, the first of transformers' processors (before the repetition penalty)."""
    return _add_sequence_bias(logits, rules.bias, tokens, length) if rules.bias else logits


def penalize_source(logits, rules: Rules, source):
    """``encoder_repetition_penalty``, before the repetition penalty: transformers'
    ``EncoderRepetitionPenaltyLogitsProcessor``, each token of the row's input (``source``,
    ``[rows, n]``, padding and all) multiplied by the penalty, or divided where negative."""
    if rules.source_penalty is None:
        return logits
    # transformers keeps 1 / penalty: the repetition penalty's arithmetic with that
    return penalize(logits, mark_seen(jnp.zeros(logits.shape, bool), source), np.float32(1 / rules.source_penalty))


def ban_source_ngrams(logits, rules: Rules, tokens, length, source):
    """``encoder_no_repeat_ngram_size``, after n-gram blocking: transformers'
    ``EncoderNoRepeatNGramLogitsProcessor``, -inf for every token that would complete an n-gram of
    the row's input (``source``), once the sequence (``tokens[:, :length]``) holds ``n - 1`` tokens."""
    if rules.source_ngram is None:
        return logits
    return ban_ngram_completions(logits, source, tokens, length, rules.source_ngram)


def ban_bad_words(logits, rules: Rules, tokens, length):
    """``bad_words_ids``, after n-gram blocking: transformers' ``NoBadWordsLogitsProcessor``, a
    sequence bias of -inf."""
    return _add_sequence_bias(logits, [(ids, -math.inf) for ids in rules.bad], tokens, length) if rules.bad else logits


def force_and_suppress(logits, rules: Rules, step):
    """The processors after the minimum length, in transformers' order: the forced first token, the
    forced last token, the invalid values' removal, the length penalty's EOS boost, the suppressed
    tokens, the suppressed first tokens. ``step`` counts the new tokens before this one."""
    vocab = logits.shape[-1]
    if rules.forced_bos is not None:
        forced = jnp.where(jnp.arange(vocab) == rules.forced_bos, 0.0, -jnp.inf).astype(logits.dtype)
        logits = jnp.where(step == 0, forced[None], logits)
    if rules.forced_eos:
        forced = jnp.where(jnp.asarray(_token_mask(vocab, rules.forced_eos)), 0.0, -jnp.inf).astype(logits.dtype)
        logits = jnp.where(step == rules.forced_eos_at, forced[None], logits)
    if rules.remove_invalid:  # InfNanRemoveLogitsProcessor: a banned token becomes merely unlikely
        finite = jnp.finfo(logits.dtype)
        logits = jnp.where(jnp.isnan(logits), 0.0, jnp.clip(logits, finite.min, finite.max)).astype(logits.dtype)
    if rules.decay is not None:
        start, factor, eos = rules.decay
        eos = jnp.asarray(eos, jnp.int32)
        eos_logits = logits[:, eos]
        past = jnp.maximum(step - start, 0).astype(jnp.float32)
        growth = jnp.abs(eos_logits) * (jnp.power(jnp.float32(factor), past) - 1)
        growth = jnp.where(jnp.isfinite(eos_logits) & (step > start), growth, 0.0)
        logits = logits.at[:, eos].add(growth.astype(logits.dtype))
    if rules.suppress:
        logits = jnp.where(jnp.asarray(_token_mask(vocab, rules.suppress))[None], -jnp.inf, logits)
    if rules.begin_suppress:
        banned = jnp.asarray(_token_mask(vocab, rules.begin_suppress))[None] & (step == rules.begin_at)
        logits = jnp.where(banned, -jnp.inf, logits)
    return logits
