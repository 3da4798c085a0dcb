"""Jitted generation for encoder-decoder models: encode once, then decode with a KV cache.

The encoder runs once; each decoder block's cross-attention keys and values of its output are
computed once too; the decoder's self-attention keeps a KV cache (``peftjax.models._attention``).
Decoding starts from ``decoder_start_token_id`` and picks tokens greedily, by sampling with the
causal models' filters or by beam search, with the causal models' logits processors.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import _beam_search as beam_search
from peftjax.models._generation import (
    PROCESSOR_ARGUMENTS,
    _constrain,
    beam_arguments,
    beam_key,
    beam_log_probs,
    choose_scored,
    compute_transition_scores,
    continuation_stops,
    decode_until_done,
    decoding_arguments,
    ended,
    generate_output,
    generated_length,
    generation_records,
    recorded,
    remember,
    reorder_rows,
    repeat_rows,
    start_past,
    unrun_outputs,
)
from peftjax.models._logits import check_source_rules
from peftjax.models._streaming import check_streamer, put_tokens, streaming
from peftjax.nn._keys import default_key


def _decoder(model, input_ids, attention_mask, inputs_embeds, prefix_kv, encoder_prefix_kv, slots: int):
    """The inputs encoded once (their cross-attention keys and values with them) and the decoder's
    step over them: ``(rows, empty cache of slots, decode)``, where ``decode(tokens, cache,
    key_mask, i)`` feeds ``tokens`` (``[rows]``) at position ``i`` and returns ``(next-token logits,
    cache, key_mask)``."""
    encoded = model.encode(None if inputs_embeds is not None else input_ids, attention_mask, inputs_embeds,
                           encoder_prefix_kv).last_hidden_state
    cross_kv = model.decoder.cross_kv(encoded)

    def decode(tokens, cache, key_mask, i):
        key_mask = key_mask.at[:, i].set(1)
        out = model(encoder_outputs=encoded, attention_mask=attention_mask, decoder_input_ids=tokens[:, None],
                    decoder_attention_mask=key_mask, cache=cache, cache_index=i, cross_kv=cross_kv,
                    prefix_kv=prefix_kv)
        return out.logits[:, -1], out.past_key_values, key_mask

    rows = encoded.shape[0]
    return rows, model.init_cache(rows, slots), decode


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "do_sample", "eos", "start", "ngram", "rules", "stop", "record"),
)
def _generate(graphdef, state, input_ids, attention_mask, rng, inputs_embeds, prefix_kv, encoder_prefix_kv, *,
              max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad, start, penalty=None, min_new=None,
              ngram=None, rules=None, occurrence=None, token_bias=None, stop=None, stop_table=None, stream=None,
              record=(), **warpers):
    model = nnx.merge(graphdef, state)
    b, cache, decode = _decoder(model, input_ids, attention_mask, inputs_embeds, prefix_kv, encoder_prefix_kv,
                                max_new_tokens)
    key_mask = jnp.zeros((b, max_new_tokens), jnp.int32)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    first = jnp.full((b,), start, jnp.int32)
    # the decoder's tokens so far, the start token first (the processors count it, as transformers')
    past = start_past(first[:, None], model.config.vocab_size, max_new_tokens, penalty=penalty, ngram=ngram,
                      rules=rules, source=input_ids, keep_tokens=stop is not None or occurrence is not None)

    def step(carry, i):
        token, cache, key_mask, done, rng, past = carry
        logits, cache, key_mask = decode(token, cache, key_mask, i)
        rng, key = jax.random.split(rng)
        raw = logits.astype(jnp.float32)
        logits = _constrain(raw, past, i, penalty=penalty, min_new=min_new, eos_ids=eos_ids, ngram=ngram, prompt=1,
                            rules=rules, occurrence=occurrence, token_bias=token_bias)
        new, scores = choose_scored(logits, key, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                    top_p=top_p, **warpers)
        new = jnp.where(done, pad, new)
        put_tokens(stream, new)
        past = remember(past, new, 1 + i)
        done = ended(done, new, eos_ids, past, 2 + i, stop, stop_table)
        columns = (new, done, *recorded(record, scores=scores, logits=raw, token=new))
        return (new, cache, key_mask, done, rng, past), columns

    carry = (first, cache, key_mask, jnp.zeros((b,), bool), rng, past)
    outputs = unrun_outputs(b, max_new_tokens, pad, record, model.config.vocab_size)
    return decode_until_done(step, carry, 0, max_new_tokens, outputs, operator.itemgetter(3))[1]


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "eos", "start", "num_beams", "num_return_sequences",
                     "early_stopping", "renormalize", "ngram", "rules", "min_keep", "stop"),
)
def _beam_generate(graphdef, state, input_ids, attention_mask, inputs_embeds, prefix_kv, encoder_prefix_kv, rng=None, *,
                   max_new_tokens, eos, start, num_beams, num_return_sequences, early_stopping, length_penalty, fill,
                   renormalize=False, penalty=None, min_new=None, ngram=None, rules=None, sampling=None, min_keep=1,
                   stop=None, stop_table=None, occurrence=None, token_bias=None):
    """Beam search (:mod:`peftjax.models._beam_search`) of inputs already repeated ``num_beams``
    times each (each beam's row encoded, so that row-wise state, a mixed batch's adapter per row,
    covers the encoder as the decoder), or beam sampling (``sampling``, its key ``rng``):
    ``([batch * num_return_sequences, max_new_tokens] tokens, lengths)``."""
    model = nnx.merge(graphdef, state)
    # the start token, then one slot a step
    rows, cache, decode = _decoder(model, input_ids, attention_mask, inputs_embeds, prefix_kv, encoder_prefix_kv,
                                   max_new_tokens + 1)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    first = jnp.full((rows,), start, jnp.int32)
    logits, cache, key_mask = decode(first, cache, jnp.zeros((rows, max_new_tokens + 1), jnp.int32), 0)
    past = start_past(first[:, None], model.config.vocab_size, max_new_tokens, penalty=penalty, ngram=ngram,
                      rules=rules, source=input_ids, keep_tokens=stop is not None or occurrence is not None)

    def body(carry):
        i, logits, cache, key_mask, beams, past, _ = carry
        log_probs = beam_log_probs(logits, past, i, penalty=penalty, min_new=min_new, eos_ids=eos_ids, ngram=ngram,
                                   prompt=1, renormalize=renormalize, rules=rules, sampling=sampling,
                                   min_keep=min_keep, occurrence=occurrence, token_bias=token_bias)
        beams, parents, tokens, going = beam_search.step(beams, log_probs, i, eos=eos, max_new_tokens=max_new_tokens,
                                                         length_penalty=length_penalty, early_stopping=early_stopping,
                                                         key=beam_key(rng, i),
                                                         stops=continuation_stops(stop, stop_table, past, 2 + i))
        past = remember(past, tokens, 1 + i, parents)
        logits, cache, key_mask = decode(tokens, reorder_rows(cache, parents), key_mask, i + 1)
        return i + 1, logits, cache, key_mask, beams, past, going

    beams = beam_search.init(rows // num_beams, num_beams, max_new_tokens, fill)
    carry = (jnp.int32(0), logits, cache, key_mask, beams, past, jnp.bool_(True))
    carry = jax.lax.while_loop(lambda c: c[-1] & (c[0] < max_new_tokens), body, carry)
    return beam_search.best(carry[4], num_return_sequences)


def is_seq2seq_lm(model) -> bool:
    """An encoder-decoder LM that generates (``...ForConditionalGeneration``, ``MarianMTModel``),
    a ``PeftModel``'s base read through; T5's and BART's classifiers and question answering are not."""
    return isinstance(getattr(model, "base_model", model), Seq2SeqGenerationMixin)


class Seq2SeqGenerationMixin:
    """``generate`` for encoder-decoder models with ``encode``, ``decoder.cross_kv`` and ``init_cache``."""

    def generate(
        self,
        input_ids=None,
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
        decoder_start_token_id: int | None = None,
        seed: int = 0,
        inputs_embeds=None,
        prefix_kv=None,
        encoder_prefix_kv=None,
    ) -> np.ndarray:
        """Generates each input's output sequence, as transformers' ``generate`` for seq2seq models.

        Compiled once per input shape, ``max_new_tokens`` and kind of decoding (greedy, or sampling
        with top-k and top-p each on or off); the sampling values, seed and pad token are arguments.

        Args:
          input_ids: ``[batch, seq]`` encoder input (padding anywhere; ``attention_mask`` marks it).
          attention_mask: ``[batch, seq]``, 0 on padding.
          max_new_tokens: tokens to generate after the start token.
          do_sample, temperature, top_k, top_p, seed: sampling, as the causal models' ``generate``.
          eos_token_id: stop token(s) (default: the config's); a finished row is then padded.
          pad_token_id: filler after EOS (default: the config's, else the first EOS id).
          repetition_penalty, no_repeat_ngram_size, min_new_tokens, min_p, typical_p,
            epsilon_cutoff, eta_cutoff, top_h, bad_words_ids, sequence_bias, suppress_tokens,
            begin_suppress_tokens, forced_bos_token_id, forced_eos_token_id,
            exponential_decay_length_penalty: as the causal models' ``generate``, over the
            decoder's tokens (the start token included, as transformers counts them: a forced
            first token follows it).
          encoder_repetition_penalty, encoder_no_repeat_ngram_size: as the causal models',
            over the encoder's input ids (padding and all; they need ``input_ids``).
          remove_invalid_values, stop_strings, tokenizer: as the causal models' (the stop strings
            over the decoder's text).
          stop_strings_in_prompt: ``False``: a stop string must lie wholly in the new tokens, not
            begin in the decoder's start token (``peftjax serve``'s rule).
          presence_penalty, frequency_penalty: as the causal models', over the decoder's new tokens.
          streamer: as the causal models' (``put`` first gets each row's decoder start token).
          output_scores, output_logits, return_dict_in_generate, output_logprobs: as the causal models'.
          num_beams, num_return_sequences, length_penalty, early_stopping: beam search and the
            sequences per input, as the causal models' ``generate`` (the length a beam's score is
            divided by counts its tokens after the start token).
          The sampling settings, ``eos_token_id`` and ``pad_token_id`` default to the checkpoint's
          ``generation_config.json`` first, as the causal models' ``generate``.
          decoder_start_token_id: the decoder's first token (default: the config's).
          inputs_embeds: ``[batch, seq, d_model]`` encoder input embeddings in place of ``input_ids``.
          prefix_kv, encoder_prefix_kv: prefixes for the decoder and encoder blocks (see ``__call__``).

        Returns:
          ``[batch * num_return_sequences, 1 + n]`` token ids starting with ``decoder_start_token_id``,
          ``n <= max_new_tokens``; generation ends early once every row has produced EOS (with
          beams: once no beam can improve).
        """
        # the sampling filters and token rules, by their (transformers') names
        processors = {name: value for name, value in locals().items() if name in PROCESSOR_ARGUMENTS}
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            inputs_embeds = jnp.asarray(inputs_embeds)
            if inputs_embeds.ndim != 3:
                raise ValueError(f"inputs_embeds must be [batch, seq, d_model], got shape {inputs_embeds.shape}")
            shape = inputs_embeds.shape[:2]
        else:
            input_ids = jnp.asarray(input_ids, jnp.int32)
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
            shape = input_ids.shape
        mask = jnp.ones(shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"attention_mask must have the input's shape {tuple(shape)}, got {tuple(mask.shape)}")
        decoding = decoding_arguments(self, max_new_tokens, do_sample, temperature, top_k, top_p,
                                      eos_token_id, pad_token_id, repetition_penalty=repetition_penalty,
                                      min_new_tokens=min_new_tokens, prompt_length=1, num_beams=num_beams,
                                      num_return_sequences=num_return_sequences, length_penalty=length_penalty,
                                      early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size,
                                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                      processors=processors, stop_strings=stop_strings, tokenizer=tokenizer,
                                      batch=shape[0], stop_first=0 if stop_strings_in_prompt else 1)
        search = decoding.pop("search")
        if decoder_start_token_id is None:
            decoder_start_token_id = getattr(self.config, "decoder_start_token_id", None)
        if decoder_start_token_id is None:
            raise ValueError("decoder_start_token_id is not set (pass it, or set it in the config; T5 uses 0)")
        graphdef, state = nnx.split(self)
        beams, returned = search["num_beams"], search["num_return_sequences"]
        check_source_rules(decoding["rules"], rows_per_input=max(beams, returned), has_input_ids=input_ids is not None)
        check_streamer(streamer, num_beams=beams)
        record, as_dict = generation_records(self, output_scores, output_logits, return_dict_in_generate, beams=beams,
                                             output_logprobs=output_logprobs)
        if beams > 1:
            if prefix_kv is not None or encoder_prefix_kv is not None:
                raise NotImplementedError("beam search with prefix_kv or encoder_prefix_kv given is not implemented "
                                          "(a prefix-tuning adapter's generate passes its own)")
            rows = [repeat_rows(x, beams) for x in (input_ids, mask, inputs_embeds)]
            arguments = beam_arguments(decoding, search)
            rng = None if arguments["sampling"] is None else default_key(seed)
            tokens, lengths = _beam_generate(graphdef, state, *rows, None, None, rng, start=int(decoder_start_token_id),
                                             **arguments)
            tokens, n, records = np.asarray(tokens), int(np.max(np.asarray(lengths))), ()
        else:
            input_ids, mask, inputs_embeds = (repeat_rows(x, returned) for x in (input_ids, mask, inputs_embeds))
            # the streamer's "prompt": each row's decoder start token, as transformers puts it
            with streaming(streamer, np.full((mask.shape[0], 1), decoder_start_token_id)) as stream:
                tokens, done, *records = _generate(
                    graphdef, state, input_ids, mask, default_key(seed), inputs_embeds, prefix_kv, encoder_prefix_kv,
                    start=int(decoder_start_token_id), stream=stream, record=record, **decoding,
                )
                tokens, n = np.asarray(tokens), generated_length(np.asarray(done), max_new_tokens)
        start = np.full((tokens.shape[0], 1), decoder_start_token_id, tokens.dtype)
        sequences = np.concatenate([start, tokens[:, :n]], axis=1)
        return generate_output(sequences, record, records, n, as_dict)

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False):
        """Each generated token's score, ``[rows, steps]``, as transformers'
        (:func:`~peftjax.models._generation.compute_transition_scores`)."""
        return compute_transition_scores(sequences, scores, beam_indices, normalize_logits)
