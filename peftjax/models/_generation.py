"""Jitted generation with a KV cache for the causal models: greedy, sampled (temperature, top-k,
top-p, min-p, typical, epsilon, eta) or by beam search, with transformers' logits processors (the
repetition penalty, n-gram blocking, the minimum length, and :mod:`peftjax.models._logits`' token
rules)."""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _beam_search as beam_search
from peftjax.models._stop_strings import StopStrings, stop_string_hits, stop_strings_arguments
from peftjax.models._streaming import check_streamer, put_tokens, streaming
from peftjax.models._logits import (
    RULES,
    WARPERS,
    Rules,
    SAMPLING_FILTERS,
    ban_bad_words,
    ban_ngram_completions,
    ban_source_ngrams,
    bias_sequences,
    check_source_rules,
    filter_logits,
    force_and_suppress,
    mark_seen,
    add_token_bias,
    occurrence_arguments,
    penalize_occurrences,
    split_token_bias,
    penalize,
    penalize_source,
    rules_arguments,
    warper_arguments,
)
from peftjax.nn._keys import default_key

GENERATION_CONFIG_NAME = "generation_config.json"
PROCESSOR_ARGUMENTS = frozenset((*WARPERS, *RULES))  # generate's arguments that go to decoding_arguments' processors


class Past(NamedTuple):
    """What the logits processors read of each row's sequence so far: ``seen`` (``[rows, vocab]``,
    whether each token occurred; the repetition penalty's) and ``tokens`` (``[rows, prompt +
    max_new_tokens]``, the prompt's ids then the generated ones; n-gram blocking's and a biased or
    banned sequence's) and ``source`` (``[rows, n]``, the row's input ids: the encoder's, or a
    decoder's prompt; the encoder rules'). Each is ``None`` where no processor reads it."""

    seen: Any = None
    tokens: Any = None
    source: Any = None


def start_past(input_ids, vocab: int, max_new_tokens: int, *, penalty, ngram, counted=None,
               rules: Rules | None = None, source=None, keep_tokens: bool = False) -> Past:
    """The :class:`Past` of prompts ``input_ids`` (``[rows, n]``): the penalty's tokens where
    ``counted`` (``[rows, n]``; all without it), all of them for n-gram blocking and ``rules``
    that match sequences; ``source`` (the encoder's input; default ``input_ids``) for the rules
    that read it."""
    rows, n = input_ids.shape
    seen = None if penalty is None else mark_seen(jnp.zeros((rows, vocab), bool), input_ids, counted)
    tokens = None
    if keep_tokens or ngram is not None or (rules is not None and rules.reads_tokens):
        tokens = jnp.zeros((rows, n + max_new_tokens), jnp.int32).at[:, :n].set(input_ids)
    if rules is None or not rules.reads_source:
        source = None
    elif source is None:
        source = input_ids
    return Past(seen, tokens, source)


def remember(past: Past, token: jax.Array, position, parents=None) -> Past:
    """``past`` with ``token`` (``[rows]``) at ``position`` of each row's sequence, after taking
    each row's past from row ``parents[row]`` where given (beam search)."""
    if parents is not None:  # the input is a beam's prompt's, the same for all its beams
        past = past._replace(**{k: None if x is None else x[parents] for k, x in (("seen", past.seen),
                                                                                   ("tokens", past.tokens))})
    tokens = None if past.tokens is None else past.tokens.at[:, position].set(token)
    return Past(mark_seen(past.seen, token[:, None]), tokens, past.source)


def _constrain(logits: jax.Array, past: Past, new_tokens, *, penalty, min_new, eos_ids, ngram=None,
               prompt: int = 0, rules: Rules | None = None, occurrence=None, token_bias=None) -> jax.Array:
    """The logits processors transformers' ``generate`` runs before choosing a token (greedy,
    sampled or over beams), in its order: a sequence bias (one-token entries: ``token_bias``, a
    value of the loop) and the input's repetition penalty (``rules``), the repetition penalty
    (``RepetitionPenaltyLogitsProcessor``: a token already in the sequence has its logit divided by
    ``penalty``, or multiplied where negative), peftjax's presence and frequency penalties
    (``occurrence``: OpenAI's, :func:`~peftjax.models._logits.penalize_occurrences`), n-gram
    blocking (``NoRepeatNGramLogitsProcessor``: no token that would repeat an ``ngram``-gram of the
    sequence, prompt included), the input's
    n-grams and bad words (``rules``), no EOS while fewer than ``min_new`` tokens are new
    (``MinNewTokensLengthLogitsProcessor``), then the forced and suppressed tokens and the length
    penalty (``rules``, :func:`peftjax.models._logits.force_and_suppress`). ``past`` is the rows'
    :class:`Past`, ``new_tokens`` how many tokens are new, ``prompt`` how many came before them;
    ``penalty``, ``occurrence``, ``ngram``, ``min_new`` or ``rules`` ``None``: that processor is off (a
    static choice)."""
    length = prompt + new_tokens
    if token_bias is not None:
        logits = add_token_bias(logits, token_bias)
    if rules is not None:
        logits = bias_sequences(logits, rules, past.tokens, length)
        logits = penalize_source(logits, rules, past.source)
    if penalty is not None:
        logits = penalize(logits, past.seen, penalty)
    if occurrence is not None:
        logits = penalize_occurrences(logits, occurrence, past.tokens, prompt, length)
    if ngram is not None:  # the n-grams the row holds before the current token
        logits = ban_ngram_completions(logits, past.tokens, past.tokens, length, ngram, within=length)
    if rules is not None:
        logits = ban_source_ngrams(logits, rules, past.tokens, length, past.source)
        logits = ban_bad_words(logits, rules, past.tokens, length)
    if min_new is not None:
        is_eos = jnp.isin(jnp.arange(logits.shape[-1]), eos_ids)
        logits = jnp.where(is_eos[None] & (new_tokens < min_new), -jnp.inf, logits)
    if rules is not None:
        logits = force_and_suppress(logits, rules, new_tokens)
    return logits


def choose_scored(logits: jax.Array, key, *, do_sample, temperature, top_k, top_p, **warpers):
    """``(token, scores)``: each row's next token, the likeliest or one drawn after the sampling
    filters (``warpers``: ``min_p``, ``typical_p``, ``epsilon``, ``eta``, as :func:`filter_logits`),
    and the scores it was chosen from (the processed logits, after the filters when sampling), as
    transformers' ``scores``."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits
    scores = filter_logits(logits, temperature, top_k, top_p, **warpers)
    token = jax.random.categorical(key, scores).astype(jnp.int32)
    # the filters cut to float32's lowest (softmax-safe); transformers' warpers to -inf
    return token, jnp.where(scores == jnp.finfo(scores.dtype).min, -jnp.inf, scores)


# what generate can record of each step, as ``(field, K)`` pairs: transformers' output_scores and
# output_logits (``[rows, vocab]`` each), and peftjax's output_logprobs: the chosen token's log
# probability (``[rows]``) and the K likeliest tokens' log probabilities and ids (``[rows, K]``)
RECORDS = ("scores", "logits")


def logprob_records(top: int) -> tuple[tuple[str, int], ...]:
    """The records of ``output_logprobs=top``: the chosen token's, and the ``top`` likeliest."""
    return (("logprobs", 0),) + ((("top_logprobs", top), ("top_ids", top)) if top else ())


def recorded(record: tuple[tuple[str, int], ...], *, scores, logits, token) -> tuple:
    """A step's arrays of ``record``, in its order (log probabilities: of the raw ``logits``, their
    softmax and top K computed once)."""
    arrays = {"scores": scores, "logits": logits}
    if any(name not in arrays for name, _ in record):
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        arrays["logprobs"] = jnp.take_along_axis(log_probs, token[:, None].astype(jnp.int32), axis=-1)[:, 0]
        top = max(k for _, k in record)
        if top:
            arrays["top_logprobs"], arrays["top_ids"] = jax.lax.top_k(log_probs, top)
    return tuple(arrays[name] for name, _ in record)


def record_fill(name: str, top: int, rows: int, max_new_tokens: int, vocab: int) -> jax.Array:
    """The array a record's columns are written into: ``[rows, max_new_tokens, ...]``."""
    tail = (vocab,) if name in RECORDS else (top,) if top else ()
    return jnp.zeros((rows, max_new_tokens, *tail), jnp.int32 if name == "top_ids" else jnp.float32)


def sampling_arguments(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, pad: int,
                       warpers: Mapping[str, Any] | None = None) -> dict:
    """``generate``'s sampling settings checked and made the compiled function's arguments.

    Values become arrays (a new temperature, ``top_k``, ``top_p``, ``warpers`` value or pad token
    reuses the compiled function); what changes the program stays static: sampling or greedy, and
    which filters are on (``top_k`` 0 or ``None``, ``top_p`` 1 or ``None``: off; ``warpers``, as
    :func:`peftjax.models._logits.warper_arguments` returns them: ``None``, off). Greedy decoding
    ignores the filters.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 or None: off), got {top_k!r}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 or None: off), got {top_p!r}")
    sample = bool(do_sample)
    return {
        "do_sample": sample,
        "temperature": np.float32(temperature),
        "top_k": np.int32(top_k) if sample and top_k else None,
        "top_p": np.float32(top_p) if sample and top_p is not None and top_p < 1.0 else None,
        **{name: value if sample else None for name, value in (warpers or {}).items()},
        "pad": np.int32(pad),
    }


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns, as transformers'
    ``GenerateDecoderOnlyOutput`` (``GenerateEncoderDecoderOutput``) holds it: ``sequences``
    (``generate``'s array), and with ``output_scores`` / ``output_logits`` a tuple of one
    ``[rows, vocab]`` float32 array per generated token: ``scores`` after the logits processors
    (and the sampling filters, when sampling), ``logits`` before them. With ``output_logprobs=K``
    (peftjax's; transformers has none), arrays of the generated columns: ``logprobs``
    ``[rows, steps]`` each chosen token's log probability under the raw logits, and for ``K > 0``
    ``top_logprobs`` and ``top_ids`` ``[rows, steps, K]``, the K likeliest tokens' (a served
    completion's OpenAI ``logprobs``, without holding ``[rows, steps, vocab]``). Read by attribute
    or key (``out["sequences"]``)."""

    sequences: np.ndarray
    scores: tuple[np.ndarray, ...] | None = None
    logits: tuple[np.ndarray, ...] | None = None
    logprobs: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None

    def __getitem__(self, key: str):
        return getattr(self, key)

    def keys(self) -> list[str]:
        """The fields set (``None`` ones left out, as transformers' outputs leave them)."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


def generation_records(model, output_scores, output_logits, return_dict_in_generate, *, beams: int,
                       output_logprobs: int | None = None):
    """``(record, return a GenerateOutput)``: what the loop records of each step (:data:`RECORDS`,
    :func:`logprob_records`) for ``generate``'s ``output_scores`` and ``output_logits`` (unset: the
    generation config's, else off) and ``output_logprobs``, which count only with
    ``return_dict_in_generate``, as in transformers.

    Raises:
      ValueError: ``output_logprobs`` not a non-negative integer.
      NotImplementedError: any of them with beam search.
    """
    defaults = getattr(model, "generation_config", None) or GenerationDefaults({})
    asked = {name: bool(defaults.get(name, False) if value is None else value)
             for name, value in (("output_scores", output_scores), ("output_logits", output_logits),
                                 ("return_dict_in_generate", return_dict_in_generate))}
    if output_logprobs is not None and (isinstance(output_logprobs, bool) or not isinstance(output_logprobs, int)
                                        or output_logprobs < 0):
        raise ValueError(f"output_logprobs must be an integer >= 0 (the likeliest tokens to return beside the chosen "
                         f"one), got {output_logprobs!r}")
    if output_logprobs is not None:
        asked["output_logprobs"] = True
    if beams > 1 and any(asked.values()):
        raise NotImplementedError(f"{sorted(k for k, v in asked.items() if v)} with beam search (num_beams={beams}) "
                                  "is not implemented; with num_beams=1 they are")
    if not asked["return_dict_in_generate"]:
        return (), False
    record = tuple((r, 0) for r in RECORDS if asked[f"output_{r}"])
    return record + (() if output_logprobs is None else logprob_records(output_logprobs)), True


def generate_output(sequences: np.ndarray, record: tuple[tuple[str, int], ...], arrays, steps: int, as_dict: bool):
    """``sequences``, or with ``as_dict`` a :class:`GenerateOutput` of them and the first ``steps``
    columns of each recorded array."""
    if not as_dict:
        return sequences
    fields = {}
    for (name, _), array in zip(record, arrays):
        array = np.asarray(array)  # transformers' scores and logits: tuples of per-step arrays
        fields[name] = tuple(array[:, i] for i in range(steps)) if name in RECORDS else array[:, :steps]
    return GenerateOutput(sequences, **fields)


def compute_transition_scores(sequences, scores, beam_indices=None, normalize_logits: bool = False) -> np.ndarray:
    """Each generated token's score, ``[rows, steps]``, as transformers' ``compute_transition_scores``:
    the token's entry of ``scores`` (a ``GenerateOutput``'s ``scores`` or ``logits``) at its step,
    of their log softmax with ``normalize_logits``. Without beams (``beam_indices`` is refused)."""
    if beam_indices is not None:
        raise NotImplementedError("beam_indices: peftjax's generate returns no scores with beam search")
    stacked = np.stack([np.asarray(x, np.float32) for x in scores], axis=1)  # [rows, steps, vocab]
    if normalize_logits:
        stacked = np.asarray(jax.nn.log_softmax(jnp.asarray(stacked), axis=-1))
    tokens = np.asarray(sequences)[:, -stacked.shape[1]:]
    return np.take_along_axis(stacked, tokens[..., None].astype(np.int64), axis=-1)[..., 0]


class GenerationDefaults:
    """A checkpoint's ``generation_config.json``: what ``generate`` uses for an argument not given.

    transformers' ``generate`` reads its defaults from the model's generation config, and a chat
    model's file is where its end-of-turn stop tokens are (Llama 3 Instruct's ``<|eot_id|>``,
    Gemma's ``<end_of_turn>``) and its sampling settings. ``models.from_pretrained`` keeps the file
    as the model's ``generation_config`` and ``save_pretrained`` writes it back. Immutable and
    hashed by its contents (NNX keeps it in the graph definition, a key of jit's cache).
    """

    __slots__ = ("_text", "_values")

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_text", json.dumps(dict(values), sort_keys=True))
        object.__setattr__(self, "_values", json.loads(self._text))  # JSON's values, read once

    @classmethod
    def read(cls, directory: str | os.PathLike) -> GenerationDefaults | None:
        """The directory's ``generation_config.json``, or ``None`` where it has none.

        Raises:
          ValueError: the file is not a JSON object (named).
        """
        path = Path(directory) / GENERATION_CONFIG_NAME
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a JSON object of generation settings, got {type(values).__name__}")
        return cls(values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self._text)

    def get(self, name: str, default=None):
        value = self._values.get(name)
        return default if value is None else value

    def replace(self, **changes) -> GenerationDefaults:
        """A copy with ``changes`` made; a setting given ``None`` is removed. For a setting
        ``generate`` refuses (diverse beam groups, say): ``model.generation_config =
        model.generation_config.replace(num_beam_groups=None)``."""
        values = {**self._values, **changes}
        return GenerationDefaults({k: v for k, v in values.items() if v is not None})

    def write_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def __setattr__(self, name, value):
        raise AttributeError("a model's generation_config is read-only")

    def __hash__(self) -> int:
        return hash(self._text)

    def __eq__(self, other) -> bool:
        return isinstance(other, GenerationDefaults) and other._text == self._text

    def __repr__(self) -> str:
        return f"GenerationDefaults({self._text})"


# generation_config.json settings that change what transformers' generate picks and that peftjax's
# does not implement, with the value that turns each off
_UNSUPPORTED = {"num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": 0, "dola_layers": None,
                "guidance_scale": 1.0, "watermarking_config": None, "max_time": None,
                "force_words_ids": None, "constraints": None, "token_healing": False}


def _refuse_unsupported(defaults: GenerationDefaults) -> None:
    """Raises where the checkpoint's generation config asks for decoding ``generate`` does not do,
    rather than decode otherwise than transformers would."""
    for name, off in _UNSUPPORTED.items():
        value = defaults.get(name)
        if value is not None and value != off:
            raise ValueError(
                f"the checkpoint's generation_config.json sets {name}={value!r}, which peftjax's generate does "
                "not implement (it decodes greedily, by sampling or by beam search, with transformers' other logits "
                "processors and sampling filters); to decode without it: "
                "model.generation_config = "
                f"model.generation_config.replace({name}=None)"
            )


def decoding_arguments(model, max_new_tokens: int, do_sample: bool | None, temperature: float | None,
                       top_k: int | None, top_p: float | None, eos_token_id, pad_token_id, *,
                       repetition_penalty: float | None = None, min_new_tokens: int | None = None,
                       prompt_length: int = 0, num_beams: int | None = None, num_return_sequences: int | None = None,
                       length_penalty: float | None = None, early_stopping: bool | str | None = None,
                       no_repeat_ngram_size: int | None = None, processors: Mapping[str, Any] | None = None,
                       stop_strings=None, tokenizer=None, batch: int | None = None, stop_first: int = 0,
                       presence_penalty: float | None = None, frequency_penalty: float | None = None) -> dict:
    """Every ``generate`` argument the compiled loop takes besides the model and its inputs.

    ``max_new_tokens`` is checked. An argument left ``None`` takes the model's ``generation_config``
    value (its ``generation_config.json``) as transformers' ``generate`` does, else transformers' own
    default: ``do_sample`` (greedy), ``temperature`` (1), ``top_k`` (50; 0 turns it off), ``top_p``
    (off), ``repetition_penalty`` (off), ``no_repeat_ngram_size`` (0, off), ``min_new_tokens`` (0;
    the file's ``min_length``, counted with the ``prompt_length`` tokens before the new ones, raises
    it), ``eos_token_id`` and ``pad_token_id``; the EOS and pad ids then fall back to the model
    config's (the pad id, failing that, to the first EOS id, else 0). The sampling settings go
    through :func:`sampling_arguments`. The EOS ids become a tuple: their number is a shape of the
    loop. Beam search's settings are returned apart, under ``"search"`` (:func:`search_arguments`).
    ``processors`` holds the other sampling filters (``min_p``, ``typical_p``, ``epsilon_cutoff``,
    ``eta_cutoff``) and token rules (``bad_words_ids``, ``sequence_bias``, ``suppress_tokens``, ...)
    by transformers' names, each ``None`` or missing for the generation config's
    (:mod:`peftjax.models._logits`); the rules come back as ``"rules"``. ``stop_strings`` (or the
    generation config's), read in ``tokenizer``'s vocabulary (per row: a list for each of the
    ``batch`` rows), come back as ``"stop"`` and ``"stop_table"``, matched from sequence column
    ``stop_first`` on (:mod:`peftjax.models._stop_strings`). ``presence_penalty`` and
    ``frequency_penalty`` (peftjax's; no generation config field) come back as ``"occurrence"``,
    values of the compiled loop (:func:`~peftjax.models._logits.occurrence_arguments`), as do the
    one-token entries of ``sequence_bias``, as ``"token_bias"`` (a ``[vocab]`` vector,
    :func:`~peftjax.models._logits.split_token_bias`): a new bias reuses the compiled loop.

    Raises:
      ValueError: a bad setting, or one of the generation config's that changes the decoding and is
        not implemented (diverse beam groups, n-gram blocking, ...: named, with the way to drop it).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    processors = dict(processors or {})
    unknown = sorted(set(processors) - set(WARPERS) - set(RULES))
    if unknown:
        raise TypeError(f"generate got unknown settings {unknown}; the sampling filters and token rules it takes: "
                        f"{sorted(WARPERS) + sorted(RULES)}")
    config = model.config
    defaults = getattr(model, "generation_config", None) or GenerationDefaults({})
    if do_sample is None:
        do_sample = bool(defaults.get("do_sample", False))
    _refuse_unsupported(defaults)
    search = search_arguments(defaults, do_sample, num_beams, num_return_sequences, length_penalty, early_stopping)
    if temperature is None:
        temperature = float(defaults.get("temperature", 1.0))
    if top_k is None:
        top_k = defaults.get("top_k", 50)
    if top_p is None:
        top_p = defaults.get("top_p")
    if repetition_penalty is None:
        repetition_penalty = float(defaults.get("repetition_penalty", 1.0))
    if isinstance(repetition_penalty, bool) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1: off), got {repetition_penalty!r}")
    if min_new_tokens is None:
        min_new_tokens = defaults.get("min_new_tokens", 0)
    if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
    min_new = max(int(min_new_tokens), int(defaults.get("min_length", 0)) - int(prompt_length))
    if no_repeat_ngram_size is None:
        no_repeat_ngram_size = defaults.get("no_repeat_ngram_size", 0)
    if (isinstance(no_repeat_ngram_size, bool) or not isinstance(no_repeat_ngram_size, (int, np.integer))
            or no_repeat_ngram_size < 0):
        raise ValueError(f"no_repeat_ngram_size must be an integer >= 0 (0: off), got {no_repeat_ngram_size!r}")
    if eos_token_id is None:
        eos_token_id = defaults.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos = tuple([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
    if pad_token_id is None:
        pad_token_id = defaults.get("pad_token_id", getattr(config, "pad_token_id", None))
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    # what beam search writes past a hypothesis's end: transformers' `pad_token_id or eos_token_id[0]`
    # where it has EOS ids, even none (a stop string ends beams then), else -1
    search["fill"] = -1 if eos_token_id is None else (int(pad_token_id) or (eos[0] if eos else 0))
    search["renormalize"] = bool(defaults.get("renormalize_logits", False))  # changes beams' scores only
    if stop_strings is None:
        stop_strings = defaults.get("stop_strings")
    stop, stop_table = (stop_strings_arguments(tokenizer, stop_strings, batch=batch, first=stop_first)
                        if stop_strings else (None, None))
    rules = rules_arguments(processors, defaults, vocab=getattr(config, "vocab_size", None), eos=eos,
                            prompt_length=int(prompt_length), max_new_tokens=int(max_new_tokens))
    rules, token_bias = split_token_bias(rules, getattr(config, "vocab_size", None))
    return {"max_new_tokens": int(max_new_tokens), "eos": eos,
            "penalty": None if repetition_penalty == 1.0 else np.float32(repetition_penalty),
            "min_new": np.int32(min_new) if min_new > 0 and eos else None,
            "ngram": int(no_repeat_ngram_size) or None, "rules": rules, "stop": stop, "stop_table": stop_table,
            "occurrence": occurrence_arguments(presence_penalty, frequency_penalty), "token_bias": token_bias,
            **sampling_arguments(do_sample, temperature, top_k, top_p, int(pad_token_id),
                                 warper_arguments(processors, defaults)), "search": search}


def search_arguments(defaults: GenerationDefaults, do_sample: bool, num_beams, num_return_sequences,
                     length_penalty, early_stopping) -> dict:
    """Beam search's settings, checked, each the argument's or else the generation config's or else
    transformers' default: ``num_beams`` 1 (no beam search), ``num_return_sequences`` 1,
    ``length_penalty`` 1.0, ``early_stopping`` ``False``.

    Raises:
      ValueError: a bad value; more sequences than beams; several sequences of greedy decoding.
    """
    if num_beams is None:
        num_beams = defaults.get("num_beams", 1)
    if num_return_sequences is None:
        num_return_sequences = defaults.get("num_return_sequences", 1)
    if length_penalty is None:
        length_penalty = defaults.get("length_penalty", 1.0)
    if early_stopping is None:
        early_stopping = defaults.get("early_stopping", False)
    for name, value in (("num_beams", num_beams), ("num_return_sequences", num_return_sequences)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    early_stopping = early_stopping if early_stopping == "never" else bool(early_stopping)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float, np.floating)):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if num_return_sequences > 1 and num_beams == 1 and not do_sample:
        raise ValueError(f"greedy decoding returns one sequence per input, got num_return_sequences="
                         f"{num_return_sequences}; sample (do_sample=True) or search beams (num_beams >= it)")
    if num_return_sequences > num_beams > 1:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be at most num_beams ({num_beams})")
    return {"num_beams": int(num_beams), "num_return_sequences": int(num_return_sequences),
            "length_penalty": np.float32(length_penalty), "early_stopping": early_stopping}


def stop_token_ids(model, *more) -> set[int]:
    """Every token that ends a sequence of ``model``: its config's EOS ids, its
    ``generation_config.json``'s (a chat model's end of turn) and ``more`` (a tokenizer's EOS id;
    ``None`` entries are skipped). ``generate`` stops at the ids it is given or, failing those, the
    generation config's, else the config's; a server reading finished rows stops at any of them."""
    found = set()
    defaults = getattr(model, "generation_config", None) or GenerationDefaults({})
    for ids in (getattr(model.config, "eos_token_id", None), defaults.get("eos_token_id"), *more):
        found |= {ids} if isinstance(ids, int) else set(ids or ())
    return found


def prompt_past(input_ids, attention_mask, vocab: int, max_new_tokens: int, *, penalty, ngram,
                rules: Rules | None = None, keep_tokens: bool = False) -> Past:
    """A decoder's prompts as :class:`Past`: the repetition penalty counts each prompt from its
    first real token (transformers skips the left padding; the mask's last columns are
    ``input_ids``' where virtual tokens' embeddings come before them), n-gram blocking all of it."""
    n = input_ids.shape[1]
    ids_mask = attention_mask[:, -n:] if attention_mask.shape[1] >= n else jnp.ones_like(input_ids)
    first = jnp.argmax(ids_mask != 0, axis=1)
    return start_past(input_ids, vocab, max_new_tokens, penalty=penalty, ngram=ngram,
                      counted=jnp.arange(n)[None] >= first[:, None], rules=rules, keep_tokens=keep_tokens)


def ended(done, token, eos_ids, past: Past, length, stop: StopStrings | None = None, stop_table=None):
    """Which rows have ended once ``token`` is written (``past`` holds it, ``length`` tokens in all):
    those that had, those that wrote an EOS id, those whose text now ends in a stop string."""
    done = done | jnp.isin(token, eos_ids)
    return done if stop is None else done | stop_string_hits(stop, stop_table, past.tokens, length)


def continuation_stops(stop: StopStrings | None, stop_table, past: Past, length):
    """Beam search's stop strings: ``None`` without them, else the function
    :func:`~peftjax.models._beam_search.step` takes, of each continuation's parent beam and token
    (``[batch, K]``), telling which end in a stop string once the token is written as the
    ``length``-th of the sequence (``past`` holds the running beams' tokens, rows item-major)."""
    if stop is None:
        return None

    def stops(parent, token):
        batch, keep = parent.shape
        beams = past.tokens.reshape(batch, -1, past.tokens.shape[-1])
        sequences = jnp.take_along_axis(beams, parent[..., None], axis=1).at[:, :, length - 1].set(token)
        return stop_string_hits(stop, stop_table, sequences.reshape(batch * keep, -1), length).reshape(batch, keep)

    return stops


def decode_until_done(step: Callable, carry, first: int, last: int, outputs: tuple, done_of: Callable):
    """``step(carry, i) -> (carry, columns)`` for ``i`` from ``first`` to ``last`` while some row
    has not ended (``done_of(carry)``), each of the step's columns (its tokens, ended flags, then
    any recorded scores) written into column ``i`` of the matching array of ``outputs``
    (``[rows, max_new_tokens, ...]``); the columns of steps not run keep their fill (the pad token,
    ended). transformers' ``generate`` stops at the step every row has ended at too: a batch whose
    rows all write EOS (or a stop string) early costs those steps, not ``max_new_tokens``. Returns
    ``(carry, outputs)``."""

    def going(state):
        i, carry, _ = state
        return (i < last) & ~jnp.all(done_of(carry))

    def body(state):
        i, carry, outputs = state
        carry, columns = step(carry, i)
        return i + 1, carry, write_column(outputs, columns, i)

    _, carry, outputs = jax.lax.while_loop(going, body, (jnp.int32(first), carry, tuple(outputs)))
    return carry, outputs


def write_column(outputs: tuple, columns: tuple, i) -> tuple:
    """Each of ``columns`` written as column ``i`` of its array of ``outputs``."""
    return tuple(o.at[:, i].set(c.astype(o.dtype)) for o, c in zip(outputs, columns))


def unrun_outputs(rows: int, max_new_tokens: int, pad, record: tuple[tuple[str, int], ...] = (), vocab: int = 0
                  ) -> tuple:
    """The fill of :func:`decode_until_done`'s outputs: pad tokens, every row ended, and for each
    of ``record`` its array (:func:`record_fill`)."""
    return (jnp.full((rows, max_new_tokens), pad, jnp.int32), jnp.ones((rows, max_new_tokens), bool),
            *(record_fill(name, top, rows, max_new_tokens, vocab) for name, top in record))


def generated_length(done: np.ndarray, max_new_tokens: int) -> int:
    """How many of the loop's ``max_new_tokens`` columns to return: up to the step every row had
    finished at (``done`` is ``[batch, max_new_tokens]``), as transformers stops there."""
    all_done = np.nonzero(done.all(axis=0))[0]
    return int(all_done[0]) + 1 if len(all_done) else max_new_tokens


def _prefill(model, input_ids, attention_mask, inputs_embeds, position_ids, max_new_tokens: int):
    """The prompts' run that fills a cache for ``max_new_tokens`` more: ``(output, key mask of the
    whole length, the prompts' positions)``. Only the last position's logits are computed (a long
    prompt's ``[rows, seq, vocab]`` would be the loop's largest array), the attention in causal
    blocks (the cache is written from slot 0). Positions default to counting each row's real
    tokens (left padding), as transformers' ``generate`` gives them."""
    rows, s = attention_mask.shape  # input_ids', or inputs_embeds' when given
    key_mask = jnp.zeros((rows, s + max_new_tokens), jnp.int32).at[:, :s].set(attention_mask)
    positions = position_ids
    if positions is None:
        positions = jnp.where(attention_mask == 0, 1, jnp.cumsum(attention_mask, axis=-1) - 1)
    prefill = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
    out = model(**prefill, attention_mask=key_mask, position_ids=positions,
                cache=model.init_cache(rows, s + max_new_tokens), cache_index=0, logits_to_keep=1)
    return out, key_mask, positions


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "do_sample", "eos", "ngram", "rules", "rerun_at", "stop", "record"),
)
def _generate(
    graphdef,
    state,
    input_ids,
    attention_mask,
    rng,
    inputs_embeds,
    position_ids,
    *,
    max_new_tokens,
    do_sample,
    temperature,
    top_k,
    top_p,
    eos,
    pad,
    penalty=None,
    min_new=None,
    ngram=None,
    rules=None,
    occurrence=None,
    token_bias=None,
    rerun_at=None,
    stop: StopStrings | None = None,
    stop_table=None,
    stream=None,
    record: tuple[tuple[str, int], ...] = (),
    **warpers,
):
    """``(tokens, ended flags, *record)``: each ``[rows, max_new_tokens]``, then the recorded
    arrays (``record``: ``(field, K)`` pairs, :data:`RECORDS` and :func:`logprob_records`)."""
    model = nnx.merge(graphdef, state)
    b, s = attention_mask.shape  # the prefill's length: input_ids', or inputs_embeds' when given
    out, key_mask, positions = _prefill(model, input_ids, attention_mask, inputs_embeds, position_ids, max_new_tokens)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    n = input_ids.shape[1]
    vocab = out.logits.shape[-1]
    past = prompt_past(input_ids, attention_mask, vocab, max_new_tokens, penalty=penalty, ngram=ngram,
                       rules=rules, keep_tokens=stop is not None or occurrence is not None)

    def choose(logits, done, rng, past, i):
        rng, key = jax.random.split(rng)  # one split a step, rerun or not: a seed samples the same tokens
        raw = logits.astype(jnp.float32)
        logits = _constrain(raw, past, i, penalty=penalty, min_new=min_new, eos_ids=eos_ids, ngram=ngram, prompt=n,
                            rules=rules, occurrence=occurrence, token_bias=token_bias)
        token, scores = choose_scored(logits, key, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                      top_p=top_p, **warpers)
        token = jnp.where(done, pad, token)
        put_tokens(stream, token)
        past = remember(past, token, n + i)
        done = ended(done, token, eos_ids, past, n + i + 1, stop, stop_table)
        return (token, done, *recorded(record, scores=scores, logits=raw, token=token)), rng, past

    def step(carry, i):
        logits, cache, key_mask, pos, done, rng, past = carry
        columns, rng, past = choose(logits, done, rng, past, i)
        token, done = columns[:2]
        key_mask = key_mask.at[:, s + i].set(1)
        out = model(
            input_ids=token[:, None],
            attention_mask=key_mask,
            position_ids=pos[:, None],
            cache=cache,
            cache_index=s + i,
        )
        return (out.logits[:, -1], out.past_key_values, key_mask, pos + 1, done, rng, past), columns

    carry = (out.logits[:, -1], out.past_key_values, key_mask, positions[:, -1] + 1, jnp.zeros((b,), bool), rng,
             past)
    outputs = unrun_outputs(b, max_new_tokens, pad, record, vocab)
    done_of = operator.itemgetter(4)
    if rerun_at is None:
        return decode_until_done(step, carry, 0, max_new_tokens, outputs, done_of)[1]
    # Phi-3's LongRoPE switch: tokens up to `rerun_at` one by one, then the whole sequence so far
    # again from an empty cache (its keys rotated anew), then one by one to the end
    carry, outputs = decode_until_done(step, carry, 0, rerun_at, outputs, done_of)
    logits, cache, key_mask, pos, done, rng, past = carry
    columns, rng, past = choose(logits, done, rng, past, rerun_at)
    outputs = write_column(outputs, columns, rerun_at)
    done = columns[1]
    generated = outputs[0][:, :rerun_at + 1]
    key_mask = key_mask.at[:, s + rerun_at].set(1)
    whole = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(rerun_at + 1)[None]], axis=1)
    if inputs_embeds is None:
        sequence = {"input_ids": jnp.concatenate([input_ids, generated], axis=1)}
    else:
        embedded = model.embed_input_ids(generated).astype(inputs_embeds.dtype)
        sequence = {"inputs_embeds": jnp.concatenate([inputs_embeds, embedded], axis=1)}
    out = model(**sequence, attention_mask=key_mask, position_ids=whole, cache=cache, cache_index=0,
                logits_to_keep=1)
    carry = (out.logits[:, -1], out.past_key_values, key_mask, pos + 1, done, rng, past)
    return decode_until_done(step, carry, rerun_at + 1, max_new_tokens, outputs, done_of)[1]


def beam_log_probs(logits, past: Past, i, *, renormalize: bool, sampling=None, min_keep: int = 1,
                   **processors) -> jax.Array:
    """Beam search's scores of the next token: log probabilities, then the logits processors (as
    transformers' beam search runs them), then, for beam sampling, the sampling filters
    (``sampling``: :func:`filter_logits`' settings, each keeping ``min_keep`` tokens; the
    temperature divides the log probabilities, as there), normalised again with ``renormalize``
    (the generation config's ``renormalize_logits``, transformers' ``LogitNormalization``)."""
    log_probs = _constrain(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), past, i, **processors)
    if sampling is not None:
        log_probs = filter_logits(log_probs, **sampling, min_keep=min_keep)
    return jax.nn.log_softmax(log_probs, axis=-1) if renormalize else log_probs


def beam_key(rng, i):
    """Beam sampling's key of step ``i`` (``None``: beam search)."""
    return None if rng is None else jax.random.fold_in(rng, i)


def beam_arguments(decoding: dict, search: dict) -> dict:
    """A beam loop's keyword arguments from :func:`decoding_arguments`' result (``decoding``, its
    ``"search"`` popped into ``search``): with ``do_sample``, beam sampling's filters, each keeping
    one token more than the EOS ids (transformers' ``min_tokens_to_keep`` for beams)."""
    sampling = None
    if decoding["do_sample"]:
        sampling = {k: decoding[k] for k in SAMPLING_FILTERS}
    return dict(max_new_tokens=decoding["max_new_tokens"], eos=decoding["eos"], num_beams=search["num_beams"],
                sampling=sampling, min_keep=len(decoding["eos"]) + 1,
                num_return_sequences=search["num_return_sequences"], early_stopping=search["early_stopping"],
                length_penalty=search["length_penalty"], fill=np.int32(search["fill"]),
                renormalize=search["renormalize"], penalty=decoding["penalty"], min_new=decoding["min_new"],
                ngram=decoding["ngram"], rules=decoding["rules"], stop=decoding["stop"],
                stop_table=decoding["stop_table"], occurrence=decoding["occurrence"],
                token_bias=decoding["token_bias"])


def reorder_rows(cache, parents: jax.Array):
    """The generation cache with its rows reordered: row ``r`` becomes row ``parents[r]``'s (every
    cache array has the rows first).

    Raises:
      ValueError: a cache array without the rows first (a model whose cache beam search cannot reorder).
    """
    def take(array):
        if array.ndim == 0 or array.shape[0] != parents.shape[0]:
            raise ValueError(f"beam search reorders the cache's rows, but a cache array has shape {array.shape}, "
                             f"not {parents.shape[0]} rows first")
        return jnp.take(array, parents, axis=0)

    return jax.tree.map(take, cache)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "eos", "num_beams", "num_return_sequences", "early_stopping",
                     "renormalize", "ngram", "rules", "min_keep", "stop"),
)
def _beam_generate(graphdef, state, input_ids, attention_mask, inputs_embeds, position_ids, rng=None, *,
                   max_new_tokens, eos, num_beams, num_return_sequences, early_stopping, length_penalty, fill,
                   renormalize=False, penalty=None, min_new=None, ngram=None, rules=None, sampling=None, min_keep=1,
                   stop=None, stop_table=None, occurrence=None, token_bias=None):
    """Beam search (:mod:`peftjax.models._beam_search`) over prompts already repeated ``num_beams``
    times each, or beam sampling (``sampling`` and its key ``rng``): ``([batch *
    num_return_sequences, max_new_tokens] tokens, [...] lengths)``."""
    model = nnx.merge(graphdef, state)
    rows, s = attention_mask.shape
    out, key_mask, positions = _prefill(model, input_ids, attention_mask, inputs_embeds, position_ids, max_new_tokens)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    n = input_ids.shape[1]
    past = prompt_past(input_ids, attention_mask, out.logits.shape[-1], max_new_tokens, penalty=penalty, ngram=ngram,
                       rules=rules, keep_tokens=stop is not None or occurrence is not None)

    def body(carry):
        i, logits, cache, key_mask, pos, beams, past, _ = carry
        log_probs = beam_log_probs(logits, past, i, penalty=penalty, min_new=min_new, eos_ids=eos_ids, ngram=ngram,
                                   prompt=n, renormalize=renormalize, rules=rules, sampling=sampling,
                                   min_keep=min_keep, occurrence=occurrence, token_bias=token_bias)
        beams, parents, tokens, going = beam_search.step(beams, log_probs, i, eos=eos, max_new_tokens=max_new_tokens,
                                                         length_penalty=length_penalty, early_stopping=early_stopping,
                                                         key=beam_key(rng, i),
                                                         stops=continuation_stops(stop, stop_table, past, n + i + 1))
        past = remember(past, tokens, n + i, parents)
        key_mask = key_mask.at[:, s + i].set(1)  # the rows of one prompt share its mask and positions
        out = model(input_ids=tokens[:, None], attention_mask=key_mask, position_ids=pos[:, None],
                    cache=reorder_rows(cache, parents), cache_index=s + i)
        return i + 1, out.logits[:, -1], out.past_key_values, key_mask, pos + 1, beams, past, going

    carry = (jnp.int32(0), out.logits[:, -1], out.past_key_values, key_mask, positions[:, -1] + 1,
             beam_search.init(rows // num_beams, num_beams, max_new_tokens, fill), past, jnp.bool_(True))
    carry = jax.lax.while_loop(lambda c: c[-1] & (c[0] < max_new_tokens), body, carry)
    return beam_search.best(carry[5], num_return_sequences)


def rows_per_input(model, settings: Mapping[str, Any]) -> int:
    """How many rows ``model.generate(..., **settings)`` runs for each input row: ``num_beams``
    with beam search, else ``num_return_sequences`` (each from the settings, else the model's
    generation config). Row-wise state set beside the inputs (a mixed batch's adapter per row,
    Poly's task ids) is repeated this many times, as the inputs are. Settings ``generate`` would
    refuse count as 1: it refuses them itself."""
    defaults = getattr(model, "generation_config", None) or GenerationDefaults({})

    def setting(name: str) -> int:
        value = settings.get(name)
        value = defaults.get(name, 1) if value is None else value
        return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0 else 1

    beams = setting("num_beams")
    return beams if beams > 1 else setting("num_return_sequences")


def repeat_rows(x, times: int):
    """Each row of ``x`` (``None`` stays ``None``) ``times`` times in a row, as transformers expands
    a batch for beams and returned sequences."""
    return x if x is None or times == 1 else jnp.repeat(jnp.asarray(x), times, axis=0)


class GenerationMixin:
    """``generate`` for models that implement ``init_cache`` and the cache arguments."""

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        repetition_penalty: float | None = None,
        min_new_tokens: int | None = None,
        num_beams: int | None = None,
        num_return_sequences: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        no_repeat_ngram_size: int | None = None,
        min_p: float | None = None,
        typical_p: float | None = None,
        epsilon_cutoff: float | None = None,
        eta_cutoff: float | None = None,
        top_h: float | None = None,
        bad_words_ids: list[list[int]] | None = None,
        sequence_bias: dict | list | None = None,
        suppress_tokens: list[int] | None = None,
        begin_suppress_tokens: list[int] | None = None,
        forced_bos_token_id: int | None = None,
        forced_eos_token_id: int | list[int] | None = None,
        exponential_decay_length_penalty: tuple[int, float] | None = None,
        encoder_repetition_penalty: float | None = None,
        encoder_no_repeat_ngram_size: int | None = None,
        remove_invalid_values: bool | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        stop_strings: str | list[str] | list[list[str] | None] | None = None,
        tokenizer=None,
        stop_strings_in_prompt: bool = True,
        streamer=None,
        output_scores: bool | None = None,
        output_logits: bool | None = None,
        return_dict_in_generate: bool | None = None,
        output_logprobs: int | None = None,
        seed: int = 0,
        inputs_embeds=None,
        position_ids=None,
    ) -> np.ndarray | GenerateOutput:
        """Generates continuations of (left-padded) prompts.

        The loop is compiled once per prompt shape, ``max_new_tokens`` and kind of decoding (greedy,
        or sampling with top-k and top-p each on or off; the repetition penalty and minimum length
        on or off); their values, the seed and the pad token are its arguments. To reuse it
        across prompts of other lengths, left-pad them to a common multiple, e.g.
        ``tokenizer(texts, padding=True, pad_to_multiple_of=32)`` with ``padding_side="left"``
        (``peftjax serve`` does so).

        Args:
          input_ids: ``[batch, seq]`` prompt ids, left-padded when lengths differ.
          attention_mask: ``[batch, seq]``, 0 on padding (``[batch, n]`` with ``inputs_embeds``).
          max_new_tokens: tokens to add.
          do_sample: sample instead of greedy decoding.
          temperature, top_k, top_p: sampling filters (ignored when greedy; ``top_k=0``: off).
          eos_token_id: stop token(s); a finished row is filled with ``pad_token_id``.
          pad_token_id: filler after EOS (defaults to the config's, else the first EOS id).
          repetition_penalty: a token already in the row (its prompt from the first real token,
            and what was generated) has its logit divided by it, or multiplied where negative,
            greedy or sampled (transformers' ``RepetitionPenaltyLogitsProcessor``); 1: off.
          min_new_tokens: no EOS before this many new tokens.
          no_repeat_ngram_size: no token that would repeat an n-gram of this size already in the
            row, prompt included (transformers' ``NoRepeatNGramLogitsProcessor``); 0: off.
          min_p, typical_p, epsilon_cutoff, eta_cutoff: sampling filters after top-k and top-p, as
            transformers' warpers of those names (min-p: below ``min_p`` times the likeliest
            token's probability; typical sampling's mass; a fixed, or entropy-scaled, probability
            floor); values of one compiled loop; ignored when greedy.
          top_h: top-H sampling (transformers' ``TopHLogitsWarper``, before top-k): the likeliest
            tokens until their entropy terms add up to ``top_h`` times the entropy.
          bad_words_ids: token sequences never completed (``[[id, ...], ...]``; a stop token is
            not banned, as transformers drops it).
          sequence_bias: ``{(id, ...): bias}`` (or ``[[[id, ...], bias], ...]``) added to a
            sequence's last token where the row ends in the rest of it; one-token entries are
            values of the compiled loop (a new bias compiles nothing), longer ones part of it.
          suppress_tokens, begin_suppress_tokens: token ids banned at every step, or at the first
            (the second after a forced first token).
          forced_bos_token_id: the first new token, where the prompt is one token long;
          forced_eos_token_id: the last of the ``max_new_tokens`` (an id or a list of them).
          exponential_decay_length_penalty: ``(start, factor)``: after ``start`` new tokens, the
            EOS logits grow by ``|logit| * (factor ** (new - start) - 1)``.
          encoder_repetition_penalty: a token of the row's prompt (``input_ids``, padding and
            all) has its logit multiplied by it, or divided where negative (transformers'
            "hallucination penalty"; one row per input); 1: off.
          encoder_no_repeat_ngram_size: no token that would complete an n-gram of the row's
            prompt; 0: off.
          remove_invalid_values: NaN logits become 0 and infinite ones the largest finite values
            (transformers' ``InfNanRemoveLogitsProcessor``, after the forced tokens).
          presence_penalty, frequency_penalty: peftjax's own, as OpenAI's API and vLLM define them
            (transformers has neither): a token's logit less ``frequency_penalty`` times how often it
            is among the new tokens so far, and less ``presence_penalty`` once it is (negative values
            favour repeats), after the repetition penalty; 0: off.
          stop_strings, tokenizer: a row ends once its text (prompt included) ends in one of these
            strings, the token that completes it kept, as transformers' ``StopStringCriteria``
            finds it in ``tokenizer``'s vocabulary (greedy, sampled, or a beam's continuation, which
            then ends as at an EOS token). A list of lists (``None`` or ``[]`` for none) gives each
            row its own strings, in one compiled loop (transformers has one set for all rows); the
            loop compiles for the strings' count and sizes rounded up to powers of two, so other
            strings of like sizes reuse it.
          stop_strings_in_prompt: ``False``: a stop string must lie wholly in the new tokens (an
            OpenAI-style completion's rule; ``peftjax serve``'s), not begin in the prompt.
          streamer: gets the tokens while they are generated, as transformers' ``streamer``
            (``TextStreamer``, ``TextIteratorStreamer``, or any ``put(ids)`` / ``end()`` object):
            ``put`` of the prompt rows, then of each step's ``[rows]`` tokens (pad in rows that
            have ended) as the compiled loop makes them, then ``end()`` (also when generation
            fails). Not with beam search (refused, as by transformers). The loop compiles once with
            a streamer and serves every streamer.
          output_scores, output_logits, return_dict_in_generate: with ``return_dict_in_generate``, a
            :class:`GenerateOutput` in place of the array: ``sequences`` and, as asked, each step's
            ``scores`` (the processed logits the token was chosen from: after the logits processors,
            and the sampling filters when sampling) and ``logits`` (before them), as transformers
            returns them (``model.compute_transition_scores(out.sequences, out.scores)`` reads
            them). Recording is a static choice of the compiled loop; not with beam search.
          output_logprobs: with ``return_dict_in_generate``, each chosen token's log probability
            (of the raw logits) and the ``output_logprobs`` likeliest tokens' ids and log
            probabilities, as :class:`GenerateOutput` describes (peftjax's own, for OpenAI's
            ``logprobs``).
          num_beams: beam search with this many beams (transformers' ``_beam_search``: greedy over
            the summed log probabilities; the logits processors apply to them), or beam sampling
            with ``do_sample`` (the continuations drawn after the sampling filters); 1: greedy or
            sampled decoding.
          num_return_sequences: sequences per prompt, consecutive rows of the result: the best
            beams, best first, or independent samples (at most ``num_beams``; 1 when greedy).
          length_penalty: a finished beam's score is its summed log probability over its generated
            length to this power (above 0 favours longer sequences).
          early_stopping: beam search stops once each prompt has ``num_beams`` finished beams
            (``True``), when its heuristic says none can improve (``False``), or not before that
            cannot happen at any length (``"never"``), as transformers'.

          An argument left ``None`` takes the checkpoint's ``generation_config.json`` value where
          it has one (``model.generation_config``: a chat model's end-of-turn stop tokens, its
          sampling settings, a repetition penalty), else transformers' default: greedy,
          temperature 1, ``top_k`` 50, no top-p filter or penalty, the model config's EOS and pad
          ids, one beam. A setting of the file that decodes otherwise (diverse beam groups,
          contrastive search, guidance) is refused, naming it.
          seed: the sampling key.
          inputs_embeds: ``[batch, n, hidden]`` embeddings to prefill with in place of looking up
            ``input_ids`` (prompt tuning prepends its virtual tokens this way); ``input_ids``
            still start the returned rows.
          position_ids: ``[batch, n]`` prefill positions; decoding continues from the last one.
            Default: counting the real tokens of ``attention_mask``, as transformers does.

        Returns:
          ``[batch * num_return_sequences, seq + n]`` token ids, ``n <= max_new_tokens``; like
          transformers, generation ends early once every row has produced EOS (or, with beams, once
          no beam can improve), and a beam shorter than the longest returned ends in
          ``pad_token_id`` (its first EOS id where that is 0).
        """
        # the sampling filters and token rules, by their (transformers') names
        processors = {name: value for name, value in locals().items() if name in PROCESSOR_ARGUMENTS}
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        prefill = input_ids.shape
        if inputs_embeds is not None:
            inputs_embeds = jnp.asarray(inputs_embeds)
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"inputs_embeds must be [batch ({input_ids.shape[0]}), n, hidden], got {inputs_embeds.shape}"
                )
            prefill = inputs_embeds.shape[:2]
        mask = jnp.ones(prefill, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        for name, value in (("attention_mask", mask), ("position_ids", position_ids)):
            if value is not None and tuple(jnp.shape(value)) != tuple(prefill):
                raise ValueError(f"{name} must have the prefill's shape {tuple(prefill)}, got {jnp.shape(value)}")
        if position_ids is not None:
            position_ids = jnp.asarray(position_ids, jnp.int32)
        decoding = decoding_arguments(self, max_new_tokens, do_sample, temperature, top_k, top_p,
                                      eos_token_id, pad_token_id, repetition_penalty=repetition_penalty,
                                      min_new_tokens=min_new_tokens, prompt_length=input_ids.shape[1],
                                      num_beams=num_beams, num_return_sequences=num_return_sequences,
                                      length_penalty=length_penalty, early_stopping=early_stopping,
                                      no_repeat_ngram_size=no_repeat_ngram_size,
                                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                      processors=processors, stop_strings=stop_strings, tokenizer=tokenizer,
                                      batch=input_ids.shape[0],
                                      stop_first=0 if stop_strings_in_prompt else input_ids.shape[1])
        search = decoding.pop("search")
        rerun_at = self._generation_rerun_step(int(prefill[1]), int(max_new_tokens))
        beams, returned = search["num_beams"], search["num_return_sequences"]
        check_source_rules(decoding["rules"], rows_per_input=max(beams, returned), has_input_ids=True)
        check_streamer(streamer, num_beams=beams)
        record, as_dict = generation_records(self, output_scores, output_logits, return_dict_in_generate, beams=beams,
                                             output_logprobs=output_logprobs)
        graphdef, state = nnx.split(self)
        if beams > 1:
            if rerun_at is not None:
                raise NotImplementedError(f"beam search past {type(self).__name__}'s cache rerun (LongRoPE's switch at "
                                          f"step {rerun_at}) is not implemented; generate fewer tokens or num_beams=1")
            rows = [repeat_rows(x, beams) for x in (input_ids, mask, inputs_embeds, position_ids)]
            arguments = beam_arguments(decoding, search)
            rng = None if arguments["sampling"] is None else default_key(seed)
            tokens, lengths = _beam_generate(graphdef, state, *rows, rng, **arguments)
            n = int(np.max(np.asarray(lengths)))
            return np.concatenate([np.repeat(np.asarray(input_ids), returned, axis=0), np.asarray(tokens)[:, :n]],
                                  axis=1)
        input_ids, mask, inputs_embeds, position_ids = (
            repeat_rows(x, returned) for x in (input_ids, mask, inputs_embeds, position_ids))
        with streaming(streamer, input_ids) as stream:
            tokens, done, *records = _generate(
                graphdef,
                state,
                input_ids,
                mask,
                default_key(seed),
                inputs_embeds,
                position_ids,
                **decoding,
                rerun_at=rerun_at,
                stream=stream,
                record=record,
            )
            n = generated_length(np.asarray(done), max_new_tokens)  # the streamer's last tokens are in
        sequences = np.concatenate([np.asarray(input_ids), np.asarray(tokens)[:, :n]], axis=1)
        return generate_output(sequences, record, records, n, as_dict)

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False):
        """Each generated token's score, ``[rows, steps]``, as transformers'
        (:func:`~peftjax.models._generation.compute_transition_scores`)."""
        return compute_transition_scores(sequences, scores, beam_indices, normalize_logits)

    def _generation_rerun_step(self, prefill: int, max_new_tokens: int) -> int | None:
        """The step whose token is fed with the whole sequence so far, from an empty cache.

        ``None`` (the default): every generated token is fed alone. A model whose cached keys go
        stale at some length (Phi-3's LongRoPE) returns the step ``i`` (``0 <= i < max_new_tokens``)
        at which the prompt and tokens ``0..i`` are run again in one call, as transformers'
        ``prepare_inputs_for_generation`` of that model drops its cache. A model that does so
        implements ``embed_input_ids`` (the rerun embeds the generated tokens after an
        ``inputs_embeds`` prompt).

        Args:
          prefill: the prefill's length (padding included): ``inputs_embeds``' when given, else
            ``input_ids``'.
          max_new_tokens: the tokens to generate.
        """
        return None

    def _generation_prefix_length(self) -> int:
        """Cache entries before the prompt (a prefix-tuning adapter's); 0 here."""
        return 0
