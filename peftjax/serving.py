"""Serving many adapters on one base over HTTP: requests name their adapter, one batch serves them all.

``peftjax serve BASE --adapter NAME=DIR ...`` runs :func:`make_app` on uvicorn. Requests queue up
for a :class:`BatchingGenerator`, whose worker thread takes what arrived within ``batch_wait_s``
(up to ``max_batch_size`` rows) and generates it in one call of the mixed-batch path
(``PeftModel.generate(..., adapter_names=[...])``): row ``i`` runs adapter ``i``'s weights, and
the compiled function is the same whichever adapters the rows use. On an encoder-decoder (T5, BART
and their kin) the prompt is the encoder's input, padded on the right (where each token keeps its
position), and the completion the decoder's output, after its start token.

Shapes are bucketed so that a running server compiles a handful of functions, not one per
request: the batch is padded with base-model rows to a power of two, the prompts left-padded to a
multiple of ``length_bucket`` tokens, and ``max_new_tokens`` rounded up to a power of two (each
row is cut back to what its request asked for, and at its first end-of-sequence token). Sampling
settings are values of the compiled function: a client's new temperature, ``top_k``, ``top_p``,
``min_p``, ``typical_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias`` or seed compiles nothing (turning one of them on or off does, once each; each
``no_repeat_ngram_size`` compiles its own). Each row ends inside the
compiled loop at its request's stop strings (transformers' ``StopStringCriteria`` on its new
tokens' own texts), and the batch once every row has ended; the completion is cut where the
string shows in the decoded text (decoded as written: spaces before punctuation are not cleaned
up, so a prefix's text is a prefix of the text). The two can disagree (the decoded text drops
SentencePiece's first space): a row the loop stopped whose decoded text lacks the string is
generated again, in the same batch, its strings then found in the decoded text only. Greedy
decoding is causal, so a row's tokens do not depend on the padding or on the other rows: a request
gets what its adapter alone generates. Sampled requests batch only with requests of the same
settings and seed, beam requests (``num_beams`` > 1) with those of the same beams and length, which
they run at exactly (the best beam of another length is another sequence).

The HTTP interface (JSON in, JSON out):

- ``POST /generate`` ``{"prompt": str, "adapter": str | null, "max_new_tokens": int,
  "temperature": float, "top_p": float, "top_k": int, "min_p": float, "typical_p": float,
  "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
  "logit_bias": {token id: float}, "no_repeat_ngram_size": int, "num_beams": int, "stop": str | [str],
  "seed": int, "stream": bool, "logprobs": int, "n": int}`` (``adapter`` null or
  ``"__base__"``: the base model; ``temperature`` 0, the default, is greedy; ``top_k`` 0 turns the
  filter off, unset is the checkpoint's ``generation_config.json`` value or transformers' 50;
  ``min_p``, ``typical_p``, ``repetition_penalty``, ``no_repeat_ngram_size`` and ``num_beams`` (up
  to 8: beam search, or beam sampling with a temperature; the best beam is the completion) unset are
  the generation config's, else off; ``presence_penalty`` and ``frequency_penalty`` (-2 to 2,
  OpenAI's: a token's logit less the frequency penalty times its count in the completion so far,
  and less the presence penalty once it is there) and ``logit_bias`` (OpenAI's: up to 300 token ids,
  JSON's string keys or integers, each bias from -100 to 100 added to its logit) unset are off;
  ``"stop"``, a string or a list of up to 8: the completion ends before the first of them to be
  completed in its text, as OpenAI-style servers cut it: only the new text counts, not the
  prompt's end; the row stops there inside the batch's loop, which ends once every row has;
  ``src_lang`` and ``tgt_lang``, a multilingual translation model's (NLLB-200, M2M100, mBART-50)
  languages as its tokenizer writes them (``fra_Latn``, ``fr``, ``fr_XX``): the source's token on
  the prompt, the target's forced as the first new token, as transformers' recipe translates;
  unset are the server's ``--src-lang`` and ``--tgt-lang``; requests of different target
  languages batch apart, and each target language compiles its own loop once), or with
  ``"messages"`` (a conversation, ``[{"role", "content"}, ...]``) in place of ``"prompt"``: the
  tokenizer's chat template renders it with the assistant's turn opened, and that is continued. It
  returns
  ``{"adapter", "completion", "token_ids", "prompt_tokens", "finish_reason" ("stop" | "length"),
  "batch": {"rows", "adapters"}}`` (cut at a stop string, ``token_ids`` end with the token that
  completed it; with ``"logprobs": k`` (0 to 20), ``"logprobs"``: each kept token's ``{"token",
  "token_id", "logprob", "top_logprobs"}``, the ``k`` likeliest tokens' likewise, log probabilities
  of the model's raw logits; with ``"n"`` (up to 8), that many completions, each a row of the
  batch, in ``"choices"``, the first also at the top). With ``"stream": true`` the answer is
  server-sent events: ``{"text": piece}`` for each piece of the completion as it is generated (the
  pieces add up to ``"completion"``), then the result above, then ``[DONE]`` (a failed batch:
  ``{"error": message}``). A bad request gets a 4xx with ``{"error": message}``: 400 for
  malformed JSON, a missing or empty prompt, a malformed conversation (or one for a tokenizer
  without a chat template) or a bad value, 404 for an unknown adapter (the message
  lists the loaded ones), 413 for a prompt longer than ``max_prompt_tokens``.
- ``GET /adapters``: the loaded adapters and the limits. ``GET /health``: ``{"status": "ok"}``.
- ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI's bodies,
  answers and errors, ``model`` naming the adapter (:func:`openai_body`, :func:`openai_response`).

A ``"stream": true`` request (``/generate``'s or OpenAI's) gets its text as server-sent events
while the batch's loop makes its tokens (each step's tokens leave the compiled loop through
``generate``'s ``streamer``); a piece is held back while it could be the start of a stop string or
is an unfinished character, and the pieces add up to the completion the request would get
unstreamed. Other answers come when their batch is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from peftjax.models import stop_token_ids
from peftjax.models._seq2seq_generation import is_seq2seq_lm
from peftjax.models._stop_strings import ends_in_stop_string, stop_strings_arguments
from peftjax.peft_model import MIXED_BATCH_TYPES, PeftModel
from peftjax.tuners.base import BASE


FIELDS = ("prompt", "messages", "adapter", "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p",
          "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "no_repeat_ngram_size",
          "num_beams", "stop", "seed", "logprobs", "n", "src_lang", "tgt_lang")
MAX_LOGIT_BIAS = 300  # tokens a request may bias (OpenAI's limit)
MAX_STOP_STRINGS = 8
MAX_CHOICES = 8  # completions a request may ask for (each a row of its batch)
MAX_BEAMS = 8
MAX_LOGPROBS = 20  # the likeliest tokens a request may ask for (OpenAI's chat limit): the loop records this many


class RequestError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request, validated and tokenized."""

    prompt: str
    adapter: str
    input_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    repetition_penalty: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    no_repeat_ngram_size: int | None = None
    stop: tuple[str, ...] = ()
    num_beams: int | None = None
    logprobs: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), by token id
    forced_bos: int | None = None  # a translation's target language token, forced first (tgt_lang)

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch: greedy ones of one repetition penalty,
        presence and frequency penalties, logit bias, n-gram size and number of beams, sampled
        ones of one setting (stop strings apart: each cuts its own text); each of one target
        language, if any (the decoder's forced first token is a setting of the compiled loop)."""
        # a beam search's best beam depends on its length: beams batch with the same length only
        length = self.max_new_tokens if (self.num_beams or 1) > 1 else None
        penalties = (self.repetition_penalty, self.presence_penalty, self.frequency_penalty, self.logit_bias,
                     self.forced_bos)
        if self.temperature == 0:
            return ("greedy", *penalties, self.no_repeat_ngram_size, self.num_beams, length)
        return ("sample", self.temperature, self.top_p, self.top_k, self.min_p, self.typical_p, *penalties,
                self.no_repeat_ngram_size, self.num_beams, length, self.seed)


class _LockedTokenizer:
    """The server's tokenizer with each call under its lock (a fast tokenizer is not to be used
    from two threads at once): what ``generate`` reads stop strings' vocabulary through."""

    def __init__(self, tokenizer, lock: threading.Lock):
        self._tokenizer, self._lock = tokenizer, lock

    def __getattr__(self, name: str):
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokenizer)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class BatchingGenerator:
    """Generation for many adapters on one base, batched across adapters.

    Args:
      model: a causal LM or encoder-decoder (``SEQ_2_SEQ_LM``: the prompt is the encoder's input,
        the completion the decoder's output) ``PeftModel`` with its adapters loaded (the methods
        whose layers run a different adapter per row, no DoRA).
      tokenizer: the base model's tokenizer (a transformers tokenizer).
      max_batch_size: most rows in one generate call.
      max_prompt_tokens: longest prompt accepted, in tokens.
      max_new_tokens: most new tokens a request may ask for.
      batch_wait_s: how long the worker waits for more requests after the first one of a batch.
      length_bucket: prompts are left-padded to a multiple of this many tokens.
      src_lang, tgt_lang: a multilingual translation model's (NLLB-200, M2M100, mBART-50) languages
        for requests that name none (a request's ``src_lang`` and ``tgt_lang`` fields): the
        source's token on the prompt (the tokenizer's ``src_lang``), the target's forced first
        (``forced_bos_token_id``), as transformers' recipe translates.

    Raises:
      ValueError: an adapter the mixed-batch path cannot serve (named, with why), or a language
        the model or tokenizer does not have.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_prompt_tokens: int = 512,
        max_new_tokens: int = 256,
        batch_wait_s: float = 0.01,
        length_bucket: int = 32,
        src_lang: str | None = None,
        tgt_lang: str | None = None,
    ):
        for name, config in model.peft_config.items():
            if config.peft_type not in MIXED_BATCH_TYPES or getattr(config, "is_prompt_learning", False):
                raise ValueError(f"adapter {name!r} is {config.peft_type}; serving gives each row its own adapter, "
                                 f"which works for {', '.join(MIXED_BATCH_TYPES)} adapters")
            if getattr(config, "use_dora", False):
                raise ValueError(f"adapter {name!r} uses DoRA, which cannot serve a different adapter per row "
                                 "(PEFT refuses it too); merge it into a base of its own")
        if not hasattr(model.base_model, "generate"):
            raise ValueError(f"{type(model.base_model).__name__} cannot generate; serve a causal LM or "
                             "encoder-decoder (SEQ_2_SEQ_LM) adapter")
        # the prompt is the encoder's input and the completion the decoder's output
        self.encoder_decoder = is_seq2seq_lm(model)
        for arg, value in (("max_batch_size", max_batch_size), ("max_prompt_tokens", max_prompt_tokens),
                           ("max_new_tokens", max_new_tokens), ("length_bucket", length_bucket)):
            if int(value) < 1:
                raise ValueError(f"{arg} must be >= 1, got {value}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_prompt_tokens = int(max_batch_size), int(max_prompt_tokens)
        self.max_new_tokens, self.batch_wait_s, self.length_bucket = int(max_new_tokens), batch_wait_s, length_bucket
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_total_tokens = int(limit) if limit else None
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # the model config's stop tokens, the checkpoint's generation_config.json's (a chat model's
        # end of turn) and the tokenizer's
        self.eos = stop_token_ids(model.base_model, tokenizer.eos_token_id)
        self._tokenizer_lock = threading.Lock()  # the worker decodes while requests are encoded
        self._stop_tokenizer = _LockedTokenizer(tokenizer, self._tokenizer_lock)  # generate's stop strings read it
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self.src_lang = self.forced_bos = None  # the server's languages: none until checked
        self.src_lang, self.forced_bos = self._languages({"src_lang": src_lang, "tgt_lang": tgt_lang},
                                                         names=("src_lang", "tgt_lang"), chat=False)
        self.tgt_lang = tgt_lang
        if self.src_lang is not None:  # set once: only a request naming another source switches it
            self.tokenizer.src_lang = self.src_lang

    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config)

    # ------------------------------------------------------------------ requests

    def request(self, body: Mapping) -> Request:
        """A JSON body as a checked :class:`Request`.

        Raises:
          RequestError: what is wrong, with the HTTP status to answer with.
        """
        if not isinstance(body, Mapping):
            raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise RequestError(f"unknown fields {unknown}; accepted: {', '.join(FIELDS)}")
        prompt, chat = body.get("prompt"), "messages" in body
        if chat == ("prompt" in body):
            raise RequestError("give 'prompt' (a text to continue) or 'messages' (a conversation for the chat "
                               "template), one of them")
        if chat:
            prompt = self._chat_prompt(body["messages"])
        if not isinstance(prompt, str):
            raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise RequestError("'prompt' is empty")
        adapter = body.get("adapter") or BASE
        if not isinstance(adapter, str):
            raise RequestError(f"'adapter' must be a string or null, got {type(adapter).__name__}")
        if adapter != BASE and adapter not in self.model.peft_config:
            raise RequestError(f"unknown adapter {adapter!r}; loaded: {self.adapters} (or null / {BASE!r} for "
                               "the base model)", status=404)
        max_new = _number(body, "max_new_tokens", int, min(32, self.max_new_tokens), low=1, high=self.max_new_tokens)
        temperature = _number(body, "temperature", float, 0.0, low=0.0)
        top_p = _number(body, "top_p", float, None, low=0.0, high=1.0)
        top_k = _number(body, "top_k", int, None, low=0)
        penalty = _number(body, "repetition_penalty", float, None, low=0.01)
        presence = _number(body, "presence_penalty", float, 0.0, low=-2.0, high=2.0)
        frequency = _number(body, "frequency_penalty", float, 0.0, low=-2.0, high=2.0)
        logit_bias = self._logit_bias(body.get("logit_bias"))
        min_p = _number(body, "min_p", float, None, low=0.0, high=1.0)
        typical_p = _number(body, "typical_p", float, None, low=0.01, high=1.0)
        ngram = _number(body, "no_repeat_ngram_size", int, None, low=0)
        if ngram == 1 and self.pad_token_id in self.eos and not self.encoder_decoder:  # the left padding counts
            raise RequestError("'no_repeat_ngram_size' 1 would ban this server's padding token, which also ends a "
                               "completion, from every padded request: ask for 2 or more")
        seed = _number(body, "seed", int, 0, low=0)
        beams = _number(body, "num_beams", int, None, low=1, high=MAX_BEAMS)
        if beams is None:  # the checkpoint's generation_config.json's, else one
            defaults = getattr(self.model.base_model, "generation_config", None)
            beams = int(defaults.get("num_beams", 1) or 1) if defaults is not None else 1
        stop = self._stop_strings(body.get("stop"))
        logprobs = _number(body, "logprobs", int, None, low=0, high=MAX_LOGPROBS)
        choices = _number(body, "n", int, 1, low=1, high=MAX_CHOICES)
        if choices > 1 and beams > 1:
            raise RequestError(f"'n' {choices} with beam search (num_beams {beams}) is not implemented: a request "
                               "gets its best beam")
        if logprobs is not None and beams > 1:
            raise RequestError(f"'logprobs' with beam search (num_beams {beams}) is not implemented")
        try:
            source, forced = self._languages(body, names=("'src_lang'", "'tgt_lang'"), chat=chat)
        except ValueError as e:
            raise RequestError(str(e)) from None
        with self._tokenizer_lock:
            previous = getattr(self.tokenizer, "src_lang", None)
            if source is not None and source != previous:  # the prompt's language token, this request's
                self.tokenizer.src_lang = source
            try:  # a chat template writes its own special tokens
                ids = tuple(int(i) for i in self.tokenizer(prompt, add_special_tokens=not chat)["input_ids"])
            finally:
                if source is not None and source != previous:
                    self.tokenizer.src_lang = previous
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(f"the prompt is {len(ids)} tokens; this server takes at most "
                               f"{self.max_prompt_tokens}", status=413)
        if self.max_total_tokens and self.encoder_decoder:  # the encoder's positions, and the decoder's
            if len(ids) > self.max_total_tokens:
                raise RequestError(f"the prompt is {len(ids)} tokens; the model's encoder takes at most "
                                   f"max_position_embeddings {self.max_total_tokens}", status=413)
            if 1 + max_new > self.max_total_tokens:
                raise RequestError(f"the decoder's start token + max_new_tokens {max_new} exceed the model's "
                                   f"max_position_embeddings {self.max_total_tokens}", status=413)
        elif self.max_total_tokens and len(ids) + max_new > self.max_total_tokens:
            raise RequestError(f"{len(ids)} prompt tokens + max_new_tokens {max_new} exceed the model's "
                               f"max_position_embeddings {self.max_total_tokens}", status=413)
        return Request(prompt, adapter, ids, max_new, temperature, top_p, top_k, seed, penalty, min_p, typical_p, ngram,
                       stop, beams, logprobs, choices, presence, frequency, logit_bias, forced)

    def _languages(self, body: Mapping, *, names: tuple[str, str], chat: bool) -> tuple[str | None, int | None]:
        """``(source language, target language token)`` of a body's ``src_lang`` and ``tgt_lang``,
        the server's where it names none.

        Raises:
          ValueError: a language on a model that is not an encoder-decoder, a source language on a
            tokenizer without one or with a chat template's prompt, a code that is not a language
            token of the tokenizer (each names the field and the value).
        """
        from peftjax.io._tokenizer import language_tokens

        source, target = body.get("src_lang"), body.get("tgt_lang")
        if source is None and target is None:
            return self.src_lang, self.forced_bos
        name = names[0] if source is not None else names[1]
        if not self.encoder_decoder:
            raise ValueError(f"{name} is a translation model's language; this server's "
                             f"{type(self.model.base_model).__name__} is not an encoder-decoder (SEQ_2_SEQ_LM)")
        if source is not None and chat:
            raise ValueError(f"{names[0]} with 'messages': a chat template writes its own special tokens, not a "
                             "language's; send a 'prompt'")
        with self._tokenizer_lock:
            tokens = language_tokens(self.tokenizer, source, target, names=names)
        return (self.src_lang if source is None else source,
                self.forced_bos if target is None else tokens["tgt_lang"])

    def _logit_bias(self, value) -> tuple[tuple[int, float], ...]:
        """A request's ``logit_bias``: ``{token id (a string, as JSON keys are, or an integer):
        bias from -100 to 100}``, as OpenAI's, sorted by token id."""
        if value is None:
            return ()
        vocab = len(self.tokenizer)
        if not isinstance(value, Mapping) or len(value) > MAX_LOGIT_BIAS:
            raise RequestError(f"'logit_bias' must map token ids to biases (at most {MAX_LOGIT_BIAS}), "
                               f"got {value!r}"[:300])
        out = {}
        for key, bias in value.items():
            token = int(key) if isinstance(key, str) and key.isdigit() else key
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise RequestError(f"'logit_bias': {key!r} is not a token id of this vocabulary (0 to {vocab - 1})")
            out[token] = _number({"logit_bias": bias}, "logit_bias", float, None, low=-100.0, high=100.0)
        return tuple(sorted((t, b) for t, b in out.items() if b))

    def _stop_strings(self, value) -> tuple[str, ...]:
        """A request's ``stop``: a string or a list of them."""
        if value is None:
            return ()
        stop = [value] if isinstance(value, str) else value
        if (not isinstance(stop, list) or not 1 <= len(stop) <= MAX_STOP_STRINGS
                or not all(isinstance(x, str) and x for x in stop)):
            raise RequestError(f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them, "
                               f"got {value!r}")
        try:  # the vocabulary's table for them, read now (refused here, not in the batch's loop)
            stop_strings_arguments(self._stop_tokenizer, list(stop))
        except ValueError as e:
            raise RequestError(f"'stop': {e}") from None
        return tuple(dict.fromkeys(stop))

    def _chat_prompt(self, messages) -> str:
        """A conversation rendered by the tokenizer's chat template, the assistant's turn opened."""
        from peftjax.training._chat import chat_template_of, check_messages

        try:
            check_messages(messages, "the request", "messages")
            template = chat_template_of(self.tokenizer)
        except ValueError as e:
            raise RequestError(str(e)) from None
        with self._tokenizer_lock:
            return self.tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                                      add_generation_prompt=True)

    # ------------------------------------------------------------------ generation

    def generate(self, requests: Sequence[Request], on_text: Sequence[Callable | None] | None = None) -> list[dict]:
        """Generates ``requests`` (of one :attr:`Request.batch_key`) in one mixed batch.

        Each row ends inside the loop at its request's stop strings, found in its tokens' texts
        (transformers' check); the completion is cut where the string shows in the decoded text.
        Where the two disagree (a decoder that drops a first space), a row the loop stopped whose
        decoded text lacks the string is generated again, in the same batch (so its tokens up to
        there, sampled or not, are the same) with its strings found in the decoded text only, so
        no completion ends short.

        Args:
          requests: of one :attr:`Request.batch_key`.
          on_text: per request, ``None`` or a callable that gets the completion's text while it is
            generated: each new piece (``str``) as the loop makes its tokens (a piece that may be
            the start of a stop string, or an unfinished character, is held back until it is not),
            then ``None`` once the completion is whole. The pieces add up to the result's
            ``"completion"``. Called on the thread that runs the loop's callbacks. With beams the
            text comes whole at the end (the best beam is known only then). Not for a request of
            several completions.

        Returns:
          One result a request; a request of ``n`` > 1 completions (``n`` rows of the batch) has
          them all in ``"choices"`` (each ``{"completion", "token_ids", "finish_reason"}``, and
          ``"logprobs"`` where asked), the first also at the top.
        """
        if not requests or len({r.batch_key for r in requests}) != 1:
            raise ValueError("generate takes a non-empty list of requests of one batch_key")
        if on_text is not None and len(on_text) != len(requests):
            raise ValueError(f"on_text has {len(on_text)} entries for {len(requests)} requests")
        if on_text is not None and any(f is not None and r.n > 1 for r, f in zip(requests, on_text)):
            raise ValueError("on_text streams one completion a request; a request asks for several (n > 1)")
        if any(r.n > 1 for r in requests):  # each completion a row
            rows = [dataclasses.replace(r, n=1) for r in requests for _ in range(r.n)]
            texts = None if on_text is None else [f for r, f in zip(requests, on_text) for _ in range(r.n)]
            results, at = self.generate(rows, texts), 0
            grouped = []
            for r in requests:
                mine = results[at:at + r.n]
                at += r.n
                choices = [{k: v for k, v in x.items() if k not in ("adapter", "prompt_tokens", "batch")} for x in mine]
                grouped.append({**mine[0], "choices": choices} if r.n > 1 else mine[0])
            return grouped
        on_text = [None] * len(requests) if on_text is None else list(on_text)
        streams = [None if f is None else _TextStream(r, f, self) for r, f in zip(requests, on_text)]
        results, short = self._generate(requests, stop_in_loop=set(range(len(requests))), streams=streams)
        if short:  # the same batch again, the short rows' strings found in their text only
            for i in short:
                if streams[i] is not None:
                    streams[i].restart(loop_stops=False)
            again = self._generate(requests, stop_in_loop=set(range(len(requests))) - set(short),
                                   streams=[s if i in short else None for i, s in enumerate(streams)])[0]
            for i in short:
                results[i] = again[i]
        for stream, result in zip(streams, results):
            if stream is not None:
                stream.finish(result["completion"])
        return results

    def _generate(self, requests: Sequence[Request], *, stop_in_loop: set[int],
                  streams: Sequence[_TextStream | None]) -> tuple[list[dict], list[int]]:
        """``(results, the rows the loop stopped at a string their decoded text lacks)``; the rows
        in ``stop_in_loop`` end at their stop strings inside the loop."""
        n = len(requests)
        rows = min(_next_power_of_two(n), max(self.max_batch_size, n))
        # filler rows repeat the last request, so they end where it ends (EOS, stop strings): the loop
        # stops once the real rows have ended
        padded = list(requests) + [requests[-1]] * (rows - n)
        longest = max(len(r.input_ids) for r in padded)
        width = -(-longest // self.length_bucket) * self.length_bucket
        ids = np.full((rows, width), self.pad_token_id, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for i, r in enumerate(padded):
            # left padding; an encoder's on the right, where its tokens keep their positions (BART's learned ones)
            at = slice(0, len(r.input_ids)) if self.encoder_decoder else slice(width - len(r.input_ids), width)
            ids[i, at], mask[i, at] = r.input_ids, 1
        new = min(_next_power_of_two(max(r.max_new_tokens for r in requests)), self.max_new_tokens)
        new = max(new, max(r.max_new_tokens for r in requests))
        if (requests[0].num_beams or 1) > 1:  # the best beam of another length would be another sequence
            new = requests[0].max_new_tokens
        first = requests[0]
        beams = (first.num_beams or 1) > 1
        live = [s for s in streams if s is not None]
        streamer = _BatchStreamer(list(streams)) if live and not beams else None
        stop = [list(r.stop) if i in stop_in_loop else None for i, r in enumerate(requests)]
        stop = stop + [stop[-1]] * (rows - n)
        scored = any(r.logprobs is not None for r in requests)  # one compiled variant: the most a request takes
        start = 1 if self.encoder_decoder else width  # the new tokens follow the prompt or the decoder's start token
        out = self.model.generate(
            ids, mask, adapter_names=[r.adapter for r in padded], max_new_tokens=new,
            do_sample=first.temperature > 0, temperature=first.temperature or 1.0, top_p=first.top_p,
            top_k=first.top_k, seed=first.seed, pad_token_id=self.pad_token_id,
            repetition_penalty=first.repetition_penalty, min_p=first.min_p, typical_p=first.typical_p,
            presence_penalty=first.presence_penalty, frequency_penalty=first.frequency_penalty,
            sequence_bias={(t,): b for t, b in first.logit_bias} or None,
            **({} if first.forced_bos is None else {"forced_bos_token_id": first.forced_bos}),
            no_repeat_ngram_size=first.no_repeat_ngram_size, num_beams=first.num_beams,
            num_return_sequences=1,  # one completion a request: the best beam where there are beams
            # each row ends at its own stop strings inside the loop (the batch once every row has
            # ended), matched in the new tokens only; the text is cut before the string below
            stop_strings=stop if any(stop) else None,
            tokenizer=self._stop_tokenizer, stop_strings_in_prompt=False, streamer=streamer,
            # the array, whatever the checkpoint's generation_config.json asks for, unless scored
            return_dict_in_generate=scored, **({"output_logprobs": MAX_LOGPROBS} if scored else {}),
        )
        scores, out = (out, out.sequences) if scored else (None, out)
        used = sorted({r.adapter for r in requests})
        results, short = [], []
        for i, r in enumerate(requests):
            tokens = [int(t) for t in out[i, start:start + r.max_new_tokens]]
            stop = next((k for k, t in enumerate(tokens) if t in self.eos), None)
            finish = "length" if stop is None else "stop"
            tokens = tokens if stop is None else tokens[:stop]
            text = self.decode(tokens)
            cut = self._stop_string_cut(tokens, text, r.stop)
            if cut is not None:
                tokens, text, finish = tokens[:cut[0]], cut[1], "stop"
            elif i in stop_in_loop and r.stop and self._stopped_in_loop(out[i, start:start + r.max_new_tokens],
                                                                        r.stop):
                short.append(i)
            results.append({"adapter": r.adapter, "completion": text, "token_ids": tokens,
                            "prompt_tokens": len(r.input_ids), "finish_reason": finish,
                            "batch": {"rows": n, "adapters": used}})
            if r.logprobs is not None:
                results[-1]["logprobs"] = self._logprobs(scores, i, tokens, r.logprobs)
        return results, short

    def _logprobs(self, scores, row: int, tokens: list[int], top: int) -> list[dict]:
        """Each of ``tokens`` (``row``'s kept ones): ``{"token", "token_id", "logprob", "top_logprobs"}``
        (the ``top`` likeliest, each ``{"token", "token_id", "logprob"}``), log probabilities of the
        model's distribution (its raw logits)."""
        return [{"token": self.token_text(t), "token_id": t, "logprob": float(scores.logprobs[row, k]),
                 "top_logprobs": [{"token": self.token_text(int(i)), "token_id": int(i), "logprob": float(lp)}
                                  for i, lp in zip(scores.top_ids[row, k, :top], scores.top_logprobs[row, k, :top])]}
                for k, t in enumerate(tokens)]

    def token_text(self, token: int) -> str:
        """One token's text as the completion decodes it (an unfinished character: U+FFFD)."""
        return self.decode([token])

    def _stopped_in_loop(self, row: np.ndarray, stop: tuple[str, ...]) -> bool:
        """Whether the loop ended ``row`` (a request's new tokens) at one of its stop strings: its
        tokens before the loop's filler end in one as the loop's check reads them."""
        written = np.nonzero(row != self.pad_token_id)[0]
        ran = [int(t) for t in row[:written[-1] + 1]] if len(written) else []
        return ends_in_stop_string(self._stop_tokenizer, stop, ran)

    def decode(self, tokens: Sequence[int]) -> str:
        """A completion's text: its tokens decoded without special tokens and as written (spaces
        are not cleaned up before punctuation), so that the text of a prefix of the tokens is a
        prefix of the whole text and the streamed pieces add up to the completion."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _stop_string_cut(self, tokens: list[int], text: str, stop: tuple[str, ...]) -> tuple[int, str] | None:
        """Where the completion ends at its first stop string: ``(tokens kept, text before the
        string)``, the tokens up to the one that completes it; ``None`` where none occurs."""
        found = first_stop_string(text, stop)
        if found is None:
            return None
        at, string = found
        for k in range(1, len(tokens) + 1):  # the first prefix whose text holds the string
            if len(self.decode(tokens[:k])) >= at + len(string):
                return k, text[:at]
        return len(tokens), text[:at]

    # ------------------------------------------------------------------ the worker

    def submit(self, request: Request, on_text: Callable | None = None) -> concurrent.futures.Future:
        """Queues ``request``; the future resolves to its result dict. ``on_text`` gets its text
        while it is generated, as :meth:`generate`'s (``None`` at the end, also when the batch
        fails: the future then holds the error)."""
        if self._worker is None or not self._worker.is_alive():
            raise RuntimeError("the generator is not running; call start() first")
        if on_text is not None and request.n > 1:
            raise ValueError("on_text streams one completion; this request asks for several (n > 1)")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((request, future, on_text))
        return future

    def start(self) -> BatchingGenerator:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="peftjax-serve", daemon=True)
            self._worker.start()
        return self

    def close(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch, stop = [item], False
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(item[0].batch_key, []).append(item)
            for group in groups.values():
                self._serve(group)
            if stop:
                return

    def _serve(self, group) -> None:
        live = [(r, f, t) for r, f, t in group if f.set_running_or_notify_cancel()]
        if not live:
            return
        hooks = [None if t is None else _Ending(t) for _, _, t in live]
        try:
            results = self.generate([r for r, _, _ in live], on_text=hooks)
        except Exception as e:  # the server keeps serving; these requests get the error
            for _, future, _ in live:
                future.set_exception(e)
            for hook in hooks:
                if hook is not None:
                    hook(None)
            return
        for (_, future, _), result in zip(live, results):
            future.set_result(result)


class _Ending:
    """An ``on_text`` callable that passes ``None`` (the end) on once."""

    def __init__(self, on_text: Callable):
        self.on_text, self.ended = on_text, False

    def __call__(self, piece: str | None) -> None:
        if not self.ended:
            self.ended = piece is None
            self.on_text(piece)


def first_stop_string(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
    """``(where, string)`` of the first of ``stop`` to be completed in ``text`` (the one that ends
    first; of two ending together, the longer), or ``None``."""
    found = [(text.find(s), s) for s in stop if s in text]
    return min(found, key=lambda f: (f[0] + len(f[1]), f[0])) if found else None


_CONTEXT_TOKENS = 4  # tokens a stream decodes before its new ones, for theirs to come out as in the whole text


class _TextStream:
    """One request's completion text while its row's tokens arrive: new pieces go to ``emit``.

    It ends the row where the completion ends (an end-of-sequence token, the request's token count,
    the first stop string completed in the text: the text before it is the last piece). A piece is
    held back while its end could still become a stop string or is an unfinished character
    (U+FFFD). A row the loop stopped at a stop string its text lacks waits for the batch's rerun
    (:meth:`restart`), which writes the same tokens up to there and goes on.

    The text is decoded a few tokens at a time, each token's cost the same however many came
    before: from the last *mark* (where the text was settled: it did not end in an unfinished
    character), the tokens since are decoded after a few before them, whose own text (the
    context) is cut off the front, so that a SentencePiece word's space or a character's bytes come
    out as in the whole text. Where the new tokens change the context's text (byte-fallback bytes
    that make a character only with earlier ones), an earlier mark is decoded from, twice as far
    back each time. A stop string completed by a new token ends in the text after the mark."""

    def __init__(self, request: Request, emit: Callable, generator: BatchingGenerator):
        self.request, self.emit, self.generator = request, emit, generator
        self.reach = max(map(len, request.stop), default=1) - 1  # characters before the new ones a stop string spans
        self.sent: list[str] = []  # the characters emitted
        self.restart()

    def restart(self, *, loop_stops: bool = True) -> None:
        """From the row's first token again; ``loop_stops=False``: the loop no longer ends it at
        its stop strings (the rerun), so neither does the tokens' check here."""
        self.tokens: list[int] = []
        self.text: list[str] = []  # the characters of the tokens' text
        self.marks = [(0, 0, "")]  # (characters of the text there, the context's first token, the context's text)
        self.agreed = 0  # characters known to be the same at the start of self.sent and of self.text
        self.done, self.loop_stops = False, loop_stops

    def put(self, token: int) -> None:
        if self.done:
            return
        if token in self.generator.eos:
            self.done = True
            return
        self.tokens.append(token)
        self.done = len(self.tokens) >= self.request.max_new_tokens
        stop = self.request.stop
        kept = self._decode()
        start = max(0, kept - self.reach)
        recent = "".join(self.text[start:])  # where a stop string completed now lies, and the end to hold back
        found = first_stop_string(recent, stop)
        if found is not None:
            shown, self.done = start + found[0], True
        else:
            shown = len(self.text) - _held_back(recent, stop)
            # the loop ended the row at a string its text lacks: the rerun goes on from here
            self.done = self.done or (self.loop_stops and ends_in_stop_string(self.generator._stop_tokenizer, stop,
                                                                              self.tokens))
        # whether the text begins with what was sent (not while a rerun catches up with it, or where
        # new tokens changed text already sent), read from the first character that may have changed
        text, sent, agreed = self.text, self.sent, min(self.agreed, kept)
        while agreed < min(len(text), len(sent)) and text[agreed] == sent[agreed]:
            agreed += 1
        self.agreed = agreed
        if shown > len(sent) and agreed == len(sent):
            piece = text[len(sent):shown]
            self.emit("".join(piece))
            sent.extend(piece)
            self.agreed = shown

    def _decode(self) -> int:
        """``self.text`` brought up to the tokens so far; returns how many of its characters are
        as they were (those before the mark decoded from: no stop string is among them)."""
        tokens, decode = self.tokens, self.generator.decode
        while True:
            kept, start, context = self.marks[-1]
            window = decode(tokens[start:])
            if window.startswith(context):
                break
            far = 2 * start - len(tokens)  # the context's text changed: from an earlier mark, twice as far back
            while len(self.marks) > 1 and self.marks[-1][1] > far:
                self.marks.pop()
        new = window[len(context):]
        del self.text[kept:]
        self.text.extend(new)
        if not new.endswith("\ufffd"):  # settled: a mark here
            n = len(tokens)
            if n - start > 2 * _CONTEXT_TOKENS:  # a shorter context where its text is whole on its own: not
                # empty (the first token's space is cut there) and no U+FFFD (it begins at a character)
                context = decode(tokens[n - _CONTEXT_TOKENS:])
                if context and "\ufffd" not in context:
                    start, window = n - _CONTEXT_TOKENS, context
            self.marks.append((len(self.text), start, window))
        return kept

    def finish(self, completion: str) -> None:
        """The rest of the completion, then ``None``."""
        sent = "".join(self.sent)
        if not completion.startswith(sent):
            raise RuntimeError(f"the streamed text {sent!r} is not the start of the completion "
                               f"{completion[:len(sent) + 20]!r}: this tokenizer's decoding is not incremental")
        if len(completion) > len(sent):
            self.emit(completion[len(sent):])
        self.emit(None)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` to hold back: an unfinished character's
    replacement marks and, before them, the longest end that begins a stop string (the
    unfinished character may go on with it: ``"t €"`` where the text ends ``t `` and a part of
    ``€``)."""
    marks = len(text) - len(text.rstrip("\ufffd"))
    settled, longest = text[:len(text) - marks], 0
    for string in stop:
        for k in range(min(len(string) - 1, len(settled)), longest, -1):
            if settled.endswith(string[:k]):
                longest = k
                break
    return marks + longest


class _BatchStreamer:
    """The batch's streamer (``generate``'s ``put`` / ``end``): row ``i``'s tokens to ``streams[i]``
    (``None``, and rows past them, ignored); the prompt's ``put`` is skipped."""

    def __init__(self, streams: list[_TextStream | None]):
        self.streams, self.prompt = streams, True

    def put(self, tokens) -> None:
        if self.prompt:
            self.prompt = False
            return
        for stream, token in zip(self.streams, np.asarray(tokens).tolist()):
            if stream is not None:
                stream.put(int(token))

    def end(self) -> None:
        pass


def _number(body: Mapping, name: str, kind: type, default, *, low=None, high=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise RequestError(f"{name!r} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise RequestError(f"{name!r} must be {bounds}, got {value!r}")
    return kind(value)


# ---------------------------------------------------------------------- OpenAI-style requests

# what an OpenAI client may send: the fields mapped onto a request, those ignored, and those taken
# only at the value that changes nothing (anything else is refused by name)
OPENAI_MAPPED = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "logprobs",
                 "top_logprobs", "n", "presence_penalty", "frequency_penalty", "logit_bias"}
# the server's own fields an OpenAI client may send too (the SDK's ``extra_body``): a translation's languages
OPENAI_EXTENSIONS = {"src_lang", "tgt_lang"}
OPENAI_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
OPENAI_NEUTRAL = {"best_of": (1,), "echo": (False,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",),
                  "response_format": ({"type": "text"},)}
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default (chat: the server's limit)


def openai_body(body, *, chat: bool, max_new_tokens: int) -> dict:
    """An OpenAI-style ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` body as
    the server's own ``/generate`` body.

    ``model`` names the adapter (``__base__``: the base model); ``prompt`` (a string, or a list of
    one) or ``messages`` (``content`` a string or text parts; a ``developer`` message is a system
    one); ``max_tokens`` (chat: ``max_completion_tokens`` too; unset: 16 for completions, the
    server's ``max_new_tokens`` for chat), ``temperature`` (unset: OpenAI's 1, which samples),
    ``top_p``, ``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty`` and ``logit_bias``; and
    the server's own ``src_lang`` and ``tgt_lang`` (a translation's languages; the SDK's ``extra_body``). A
    field that would change what is generated and that the server does not do (``best_of``,
    ``echo``, a suffix, tools, a JSON response format) is refused by name unless at its neutral
    value; ``n`` asks for several choices (not with ``stream``). Log probabilities: completions'
    ``logprobs`` (0 to 5 likeliest tokens beside each chosen one), chat's ``logprobs`` and
    ``top_logprobs`` (0 to 20); not with ``stream``.
    ``stream`` is read by the route (:func:`openai_chunk`).

    Raises:
      RequestError: a malformed body, an unknown field, or one refused as above.
    """
    if not isinstance(body, Mapping):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    own = {"messages", "max_completion_tokens"} if chat else {"prompt"}
    unknown = sorted(set(body) - OPENAI_MAPPED - OPENAI_EXTENSIONS - OPENAI_IGNORED - set(OPENAI_NEUTRAL) - own)
    if unknown:
        raise RequestError(f"unknown fields {unknown} for {'chat ' if chat else ''}completions")
    for name, neutral in OPENAI_NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise RequestError(f"{name!r}: this server takes only {neutral[0]!r}, got {body[name]!r}")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(f"'stream' must be true or false, got {body['stream']!r}")
    options = body.get("stream_options")
    if options is not None and (not body.get("stream") or not isinstance(options, Mapping)
                                or set(options) - {"include_usage"}):
        raise RequestError(f"'stream_options' is for a streamed request and takes 'include_usage', got {options!r}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(f"'model' must name an adapter (GET /v1/models) or {BASE!r}, got {model!r}")
    out = {"adapter": model, "temperature": _number(body, "temperature", float, 1.0, low=0.0, high=2.0)}
    for name in ("top_p", "stop", "seed", "n", "presence_penalty", "frequency_penalty", "logit_bias",
                 *sorted(OPENAI_EXTENSIONS)):
        if body.get(name) is not None:
            out[name] = body[name]
    if body.get("stream") and body.get("n", 1) != 1:
        raise RequestError("'n' above 1 with 'stream' is not implemented; ask for one or the other")
    logprobs = _openai_logprobs(body, chat=chat)
    if logprobs is not None:
        if body.get("stream"):
            raise RequestError("'logprobs' with 'stream' is not implemented; ask for one or the other")
        out["logprobs"] = logprobs
    if chat:
        out["messages"] = _openai_messages(body.get("messages"))
        given = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        default = max_new_tokens
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(f"'prompt' must be a string (or a list of one), got {prompt!r}"[:300])
        out["prompt"] = prompt
        given, name, default = body.get("max_tokens"), "max_tokens", OPENAI_DEFAULT_MAX_TOKENS
    out["max_new_tokens"] = _number({name: given}, name, int, min(default, max_new_tokens), low=1,
                                    high=max_new_tokens)
    return out


def _openai_logprobs(body: Mapping, *, chat: bool) -> int | None:
    """How many likeliest tokens an OpenAI body asks for beside each chosen one (``None``: no
    log probabilities): completions' ``logprobs`` (0 to 5), chat's ``logprobs: true`` with
    ``top_logprobs`` (0 to 20)."""
    if not chat:
        if body.get("top_logprobs") is not None:
            raise RequestError("'top_logprobs' is for chat completions; completions take 'logprobs': 0 to 5")
        return _number(body, "logprobs", int, None, low=0, high=5)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise RequestError(f"'logprobs' must be true or false, got {wanted!r}")
    top = _number(body, "top_logprobs", int, None, low=0, high=MAX_LOGPROBS)
    if top is not None and not wanted:
        raise RequestError("'top_logprobs' needs 'logprobs': true")
    return (top or 0) if wanted else None


def _openai_messages(messages) -> list[dict]:
    """OpenAI chat messages as the chat template's: text parts joined, ``developer`` as ``system``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RequestError(f"'messages'[{i}] must be an object with a 'role' and 'content'")
        content = message.get("content")
        if isinstance(content, list):
            texts = [part.get("text") for part in content if isinstance(part, Mapping) and part.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise RequestError(f"'messages'[{i}]: only text content parts are taken, got {content!r}"[:300])
            content = "".join(texts)
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return out


def openai_head(*, chat: bool, model: str) -> dict:
    """A new answer's ``{"id", "created", "model"}`` (every chunk of a stream repeats them)."""
    import uuid

    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}


def openai_response(result: dict, *, chat: bool, model: str) -> dict:
    """A result of :meth:`BatchingGenerator.generate` as OpenAI's (chat) completion object (a choice
    for each of its ``"choices"``)."""
    choices = [_openai_choice(c, chat=chat, index=i) for i, c in enumerate(result.get("choices", [result]))]
    return {**openai_head(chat=chat, model=model), "object": "chat.completion" if chat else "text_completion",
            "choices": choices, "usage": _openai_usage(result)}


def _openai_choice(result: dict, *, chat: bool, index: int = 0) -> dict:
    choice = {"index": index, "finish_reason": result["finish_reason"],
              "logprobs": _openai_choice_logprobs(result, chat)}
    if chat:
        return {**choice, "message": {"role": "assistant", "content": result["completion"]}}
    return {**choice, "text": result["completion"]}


def _openai_choice_logprobs(result: dict, chat: bool) -> dict | None:
    """A result's ``logprobs`` in OpenAI's form: chat's ``{"content": [{"token", "logprob",
    "bytes", "top_logprobs"}]}``, or completions' ``{"tokens", "token_logprobs", "top_logprobs",
    "text_offset"}`` (offsets into the completion's text)."""
    entries = result.get("logprobs")
    if entries is None:
        return None
    if chat:
        def item(e):
            return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}

        return {"content": [{**item(e), "top_logprobs": [item(t) for t in e["top_logprobs"]]} for e in entries],
                "refusal": None}
    offsets, at = [], 0
    for e in entries:
        offsets.append(min(at, len(result["completion"])))
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def _openai_usage(result: dict) -> dict:
    completion = sum(len(c["token_ids"]) for c in result.get("choices", [result]))
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": completion,
            "total_tokens": result["prompt_tokens"] + completion}


def openai_chunk(head: dict, *, chat: bool, text: str | None = None, finish: str | None = None,
                 role: bool = False) -> dict:
    """One chunk of OpenAI's streamed (chat) completion: a piece of ``text``, the ``finish`` reason
    (with no text), or (chat, ``role``) the assistant's role that opens the stream. ``head``:
    ``{"id", "created", "model"}``, the same in every chunk."""
    chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None}
    return {**chunk, "choices": [{**choice, "finish_reason": finish}]}


def openai_usage_chunk(head: dict, result: dict, *, chat: bool) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: the token counts, no choices."""
    return {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
            "usage": _openai_usage(result)}


def openai_error(message: str, status: int) -> dict:
    """OpenAI's error object (what its clients read the message from)."""
    code = {404: "model_not_found", 413: "context_length_exceeded"}.get(status)
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


# ---------------------------------------------------------------------- HTTP


def require_server_packages() -> None:
    """Raises an ImportError that says what to install when the server's packages are missing."""
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"serving needs {' and '.join(missing)}: pip install 'peftjax[serve]'")


def make_app(generator: BatchingGenerator):
    """A Starlette app serving ``generator`` (started on startup, closed on shutdown)."""
    import contextlib
    import json

    require_server_packages()
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def answer(request, openai: str | None = None):
        """``/generate``, or (``openai``: ``"completions"`` or ``"chat"``) the OpenAI-style routes,
        whose bodies and answers and errors are OpenAI's."""
        def error(message: str, status: int):
            return JSONResponse(openai_error(message, status) if openai else {"error": message}, status_code=status)

        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(f"the body is not JSON: {e}", 400)
        raw = body
        stream = isinstance(raw, Mapping) and raw.get("stream", False)
        try:
            if not isinstance(stream, bool):
                raise RequestError(f"'stream' must be true or false, got {stream!r}")
            if openai:
                body = openai_body(raw, chat=openai == "chat", max_new_tokens=generator.max_new_tokens)
            elif isinstance(raw, Mapping) and "stream" in raw:
                body = {k: v for k, v in raw.items() if k != "stream"}
            req = generator.request(body)
            if stream and req.logprobs is not None:
                raise RequestError("'logprobs' with 'stream' is not implemented; ask for one or the other")
            if stream and req.n > 1:
                raise RequestError("'n' above 1 with 'stream' is not implemented; ask for one or the other")
        except RequestError as e:
            return error(str(e), e.status)
        if stream:
            if not openai:
                events = streamed(req, opening=[], piece=lambda text: {"text": text}, closing=lambda result: [result],
                                  failure=lambda message: {"error": message})
                return StreamingResponse(events, media_type="text/event-stream")
            chat, usage = openai == "chat", bool((raw.get("stream_options") or {}).get("include_usage"))
            head = openai_head(chat=chat, model=body["adapter"])
            events = streamed(
                req, opening=[openai_chunk(head, chat=chat, role=True)] if chat else [],
                piece=lambda text: openai_chunk(head, chat=chat, text=text),
                closing=lambda result: [openai_chunk(head, chat=chat, finish=result["finish_reason"]),
                                        *([openai_usage_chunk(head, result, chat=chat)] if usage else [])],
                failure=lambda message: openai_error(message, 500))
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            result = await asyncio.wrap_future(generator.submit(req))
        except Exception as e:  # a failed batch: this request fails, the server stays up
            return error(f"generation failed: {type(e).__name__}: {e}", 500)
        if not openai:
            return JSONResponse(result)
        return JSONResponse(openai_response(result, chat=openai == "chat", model=body["adapter"]))

    async def streamed(req: Request, *, opening: list[dict], piece, closing, failure):
        """One request's server-sent events: ``opening``, then ``piece(text)`` for each piece of text
        as the batch's loop makes it, then ``closing(result)``, then ``[DONE]``; a failed batch ends
        the stream with ``failure(message)``."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_text(text: str | None) -> None:  # on the loop's callback thread
            with contextlib.suppress(RuntimeError):  # the server has shut down
                loop.call_soon_threadsafe(pieces.put_nowait, text)

        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        future = generator.submit(req, on_text=on_text)
        for data in opening:
            yield event(data)
        while (text := await pieces.get()) is not None:
            yield event(piece(text))
        try:
            result = await asyncio.wrap_future(future)
        except Exception as e:
            yield event(failure(f"generation failed: {type(e).__name__}: {e}"))
            return
        for data in closing(result):
            yield event(data)
        yield "data: [DONE]\n\n"

    async def generate(request):
        return await answer(request)

    async def completions(request):
        return await answer(request, "completions")

    async def chat_completions(request):
        return await answer(request, "chat")

    async def openai_models(request):
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "peftjax"}
            for name in [*generator.adapters, BASE]]})

    async def adapters(request):
        return JSONResponse({"adapters": generator.adapters, "base": BASE,
                             "max_batch_size": generator.max_batch_size,
                             "max_prompt_tokens": generator.max_prompt_tokens,
                             "max_new_tokens": generator.max_new_tokens,
                             **{k: v for k, v in (("src_lang", generator.src_lang), ("tgt_lang", generator.tgt_lang))
                                if v is not None}})

    async def health(request):
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        generator.start()
        try:
            yield
        finally:
            await asyncio.to_thread(generator.close)

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/adapters", adapters),
                             Route("/health", health), Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", openai_models)], lifespan=lifespan)


def load_for_serving(base: str | os.PathLike, adapters: Mapping[str, str | os.PathLike], *,
                     dtype=None, strict: bool = True, quantization_config=None) -> PeftModel:
    """The base model with every adapter of ``adapters`` (``{name: directory or Hub id}``) loaded;
    ``quantization_config``: the base quantized (``peftjax.quantization.QuantizationConfig``)."""
    from peftjax.auto import AutoPeftModel

    items = list(adapters.items())
    if not items:
        raise ValueError("give at least one adapter (--adapter NAME=DIR); `peftjax generate` runs the base alone")
    (name, path), rest = items[0], items[1:]
    model = AutoPeftModel.from_pretrained(path, base, adapter_name=name, dtype=dtype, strict=strict,
                                          quantization_config=quantization_config)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name, strict=strict)
    return model


def serve(generator: BatchingGenerator, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning",
          announce=print) -> None:
    """Runs the HTTP server until interrupted; ``port=0`` takes a free port. ``announce`` gets the URL."""
    import socket

    require_server_packages()
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(generator), log_level=log_level))
    announce(f"peftjax: serving {generator.adapters or ['(base model only)']} on http://{host}:{bound}")
    server.run(sockets=[sock])
