"""Jitted generation for encoder-decoder models: encode once, then decode with a KV cache.

The encoder runs once; each decoder block's cross-attention keys and values of its output are
computed once too; the decoder's self-attention keeps a KV cache (``peftjax.models._attention``).
Decoding starts from ``decoder_start_token_id`` and picks tokens greedily or by sampling with the
causal models' filters (temperature, top-k, top-p), repetition penalty and minimum length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._generation import _choose, _constrain, _mark_seen, decoding_arguments, generated_length
from peftjax.nn._keys import default_key


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "do_sample", "eos", "start"),
)
def _generate(graphdef, state, input_ids, attention_mask, rng, inputs_embeds, prefix_kv, encoder_prefix_kv, *,
              max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad, start, penalty=None, min_new=None):
    model = nnx.merge(graphdef, state)
    encoded = model.encode(None if inputs_embeds is not None else input_ids, attention_mask, inputs_embeds,
                           encoder_prefix_kv).last_hidden_state
    cross_kv = model.decoder.cross_kv(encoded)
    b = encoded.shape[0]
    cache = model.init_cache(b, max_new_tokens)
    key_mask = jnp.zeros((b, max_new_tokens), jnp.int32)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    first = jnp.full((b,), start, jnp.int32)
    # the decoder's tokens so far, the start token first (the repetition penalty counts it, as transformers')
    seen = None if penalty is None else _mark_seen(jnp.zeros((b, model.config.vocab_size), bool), first[:, None])

    def step(carry, i):
        token, cache, key_mask, done, rng, seen = carry
        key_mask = key_mask.at[:, i].set(1)
        out = model(encoder_outputs=encoded, attention_mask=attention_mask, decoder_input_ids=token[:, None],
                    decoder_attention_mask=key_mask, cache=cache, cache_index=i, cross_kv=cross_kv,
                    prefix_kv=prefix_kv)
        rng, key = jax.random.split(rng)
        logits = out.logits[:, -1].astype(jnp.float32)
        logits = _constrain(logits, seen, i, penalty=penalty, min_new=min_new, eos_ids=eos_ids)
        new = _choose(logits, key, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        new = jnp.where(done, pad, new)
        done = done | jnp.isin(new, eos_ids)
        return (new, out.past_key_values, key_mask, done, rng, _mark_seen(seen, new[:, None])), (new, done)

    carry = (first, cache, key_mask, jnp.zeros((b,), bool), rng, seen)
    _, (tokens, done) = jax.lax.scan(step, carry, jnp.arange(max_new_tokens))
    return tokens.T, done.T


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
          repetition_penalty, min_new_tokens: as the causal models' ``generate``, over the decoder's
            tokens (the start token included, as transformers counts them).
          The sampling settings, ``eos_token_id`` and ``pad_token_id`` default to the checkpoint's
          ``generation_config.json`` first, as the causal models' ``generate``.
          decoder_start_token_id: the decoder's first token (default: the config's).
          inputs_embeds: ``[batch, seq, d_model]`` encoder input embeddings in place of ``input_ids``.
          prefix_kv, encoder_prefix_kv: prefixes for the decoder and encoder blocks (see ``__call__``).

        Returns:
          ``[batch, 1 + n]`` token ids starting with ``decoder_start_token_id``, ``n <= max_new_tokens``;
          generation ends early once every row has produced EOS.
        """
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
                                      min_new_tokens=min_new_tokens, prompt_length=1)
        if decoder_start_token_id is None:
            decoder_start_token_id = getattr(self.config, "decoder_start_token_id", None)
        if decoder_start_token_id is None:
            raise ValueError("decoder_start_token_id is not set (pass it, or set it in the config; T5 uses 0)")
        graphdef, state = nnx.split(self)
        tokens, done = _generate(
            graphdef, state, input_ids, mask, default_key(seed), inputs_embeds, prefix_kv, encoder_prefix_kv,
            start=int(decoder_start_token_id), **decoding,
        )
        tokens, n = np.asarray(tokens), generated_length(np.asarray(done), max_new_tokens)
        start = np.full((tokens.shape[0], 1), decoder_start_token_id, tokens.dtype)
        return np.concatenate([start, tokens[:, :n]], axis=1)
