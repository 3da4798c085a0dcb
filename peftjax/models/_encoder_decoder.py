"""What the bundled encoder-decoders (T5, mT5, UMT5, BART, mBART) share: the decoder's input
shifted from the labels, the EOS a sequence classifier reads, and the decoder pass over an encoder
output with its checks (:class:`EncoderDecoder`)."""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models import _attention as attn
from peftjax.models._losses import sequence_classification_loss
from peftjax.models._outputs import ModelOutput
from peftjax.nn._dropout import split_keys


def check_ids(input_ids, inputs_embeds, what: str):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"pass exactly one of {what}input_ids and {what}inputs_embeds")


def shift_right(labels, config, *, wrap_last: bool = False) -> jax.Array:
    """The decoder's input from ``labels`` (``-100`` read as ``pad_token_id``): transformers'
    ``_shift_right`` / ``shift_tokens_right``, ``decoder_start_token_id`` then ``labels[:, :-1]``;
    with ``wrap_last`` (mBART's) each row's last real token first instead.

    Raises:
      ValueError: ``pad_token_id`` (or, without ``wrap_last``, ``decoder_start_token_id``) is not set.
    """
    start = getattr(config, "decoder_start_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    if start is None and not wrap_last:
        raise ValueError("config.decoder_start_token_id must be set to derive decoder_input_ids from labels "
                         "(T5 uses the pad token id, 0)")
    if pad is None:
        raise ValueError("config.pad_token_id must be set to derive decoder_input_ids from labels")
    labels = jnp.asarray(labels)
    tokens = jnp.where(labels == -100, pad, labels)
    if wrap_last:
        last = jnp.sum(tokens != pad, axis=1) - 1
        first = tokens[jnp.arange(tokens.shape[0]), last][:, None]
    else:
        first = jnp.full((labels.shape[0], 1), start, labels.dtype)
    return jnp.concatenate([first, tokens[:, :-1]], axis=1)


def last_eos(input_ids, config, owner: str) -> jax.Array:
    """Each row's last ``eos_token_id`` position, where transformers' sequence classifiers of
    encoder-decoders read.

    Raises:
      ValueError: ``input_ids`` is missing, or (outside ``jit``) a row has no EOS or the rows
        differ in their number of EOS tokens.
    """
    if input_ids is None:
        raise ValueError(f"{owner} needs input_ids (the EOS tokens mark where it reads); "
                         "inputs_embeds alone are not supported, as in transformers")
    ids = jnp.asarray(input_ids)
    eos = ids == config.eos_token_id
    if not isinstance(eos, jax.core.Tracer):
        counts = np.asarray(eos.sum(axis=1))
        if len(set(counts.tolist())) != 1:
            raise ValueError(f"All examples must have the same number of <eos> tokens; found {counts.tolist()}")
        if counts[0] < 1:
            raise ValueError("Each example must contain at least one <eos> token.")
    return jnp.argmax(jnp.arange(ids.shape[1])[None, :] * eos, axis=-1)


def classified_at_last_eos(head, out: ModelOutput, last, labels, config, key) -> ModelOutput:
    """A sequence classifier's output, as transformers' encoder-decoders give it: ``head`` (called
    with ``key``, training's dropout) on the decoder's state ``out.last_hidden_state`` at each row's
    last EOS (``last``, :func:`last_eos`), and the loss with ``labels``."""
    h = out.last_hidden_state
    logits = head(h[jnp.arange(h.shape[0]), last], key)
    loss = None if labels is None else sequence_classification_loss(logits, jnp.asarray(labels), config)
    return ModelOutput(logits=logits, loss=loss, last_hidden_state=h,
                       encoder_last_hidden_state=out.encoder_last_hidden_state)


def cross_attention_mask(cross_mask, prefix_kv) -> jax.Array:
    """``[batch, 1, 1, keys]``: the decoder's cross-attention mask over the encoder's real tokens
    (``cross_mask``), after the entries of a cross-attention prefix (the first decoder layer's
    ``prefix_kv[0][1]``, where given), which every query sees."""
    keys = jnp.asarray(cross_mask).astype(bool)
    if prefix_kv is not None and prefix_kv[0][1] is not None:
        keys = attn.prefix_key_mask(keys, prefix_kv[0][1][0].shape[1])
    return keys[:, None, None, :]


class EncoderDecoder:
    """What the bundled encoder-decoders (T5's, BART's) share: a model with ``shared`` token
    embeddings, an ``encode`` method, a ``decoder`` stack (taking the embeddings, its key mask,
    ``cross_kv``, ``cross_mask``, a cache and a prefix) with ``cross_kv``, and
    ``decoder_prefix_layout``. ``shifts_input_ids``: the decoder's input defaults to
    ``input_ids`` shifted right (BART's models; T5's ask for one)."""

    shifts_input_ids: ClassVar[bool] = False

    def shift_right(self, labels) -> jax.Array:
        """transformers' ``_shift_right``: ``decoder_start_token_id`` then ``labels[:, :-1]``, -100 as pad."""
        return shift_right(labels, self.config)

    def decoder_embeddings(self, decoder_input_ids, decoder_inputs_embeds) -> jax.Array:
        """The decoder's input embeddings: ``shared``'s lookup of the ids, or the embeddings given."""
        if decoder_inputs_embeds is not None:
            return jnp.asarray(decoder_inputs_embeds)
        return self.shared(jnp.asarray(decoder_input_ids))

    def decode(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
               inputs_embeds, decoder_inputs_embeds, cache=None, cache_index=None, cross_kv=None, prefix_kv=None,
               encoder_prefix_kv=None, dropout_rng=None):
        """``(decoder output, new cache, encoder output)``: encodes unless ``encoder_outputs`` is
        given, and decodes (arguments as ``T5ForConditionalGeneration.__call__``'s).

        Raises:
          ValueError: no decoder input (and, where ``shifts_input_ids``, no ``input_ids`` to shift),
            or a prefix of the wrong layout.
        """
        enc_key, dec_key = split_keys(dropout_rng, 2)
        if self.shifts_input_ids and decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError(f"{type(self).__name__} shifts input_ids right into the decoder's input: pass "
                                 "input_ids, or decoder_input_ids / decoder_inputs_embeds")
            decoder_input_ids = self.shift_right(input_ids)
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds, encoder_prefix_kv, enc_key)
        enc = encoder_outputs.last_hidden_state if isinstance(encoder_outputs, ModelOutput) else encoder_outputs
        enc = jnp.asarray(enc)
        if attention_mask is None:
            attention_mask = jnp.ones(enc.shape[:2], bool)
        check_ids(decoder_input_ids, decoder_inputs_embeds, "decoder_")
        x = self.decoder_embeddings(decoder_input_ids, decoder_inputs_embeds)
        if prefix_kv is not None:
            self._check_decoder_prefix(prefix_kv, x.shape[0])
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones((x.shape[0], x.shape[1] if cache is None else cache[0]["k"].shape[1]),
                                              bool)
        if cross_kv is None:
            cross_kv = self.decoder.cross_kv(enc)
        h, new_cache = self.decoder(x, decoder_attention_mask, cross_kv=cross_kv, cross_mask=attention_mask,
                                    cache=cache, cache_index=cache_index, prefix_kv=prefix_kv, dropout_rng=dec_key,
                                    input_ids=decoder_input_ids)
        return h, new_cache, enc

    def _check_decoder_prefix(self, prefix_kv, batch: int) -> None:
        n, heads, head_dim = self.decoder_prefix_layout()
        pairs = list(prefix_kv)
        if len(pairs) != n or any(len(p) != 2 for p in pairs):
            raise ValueError(f"{type(self).__name__}: prefix_kv must hold one (self-attention, cross-attention) "
                             f"pair of (key, value) per decoder layer ({n}), got {len(pairs)} entries")
        owner = f"{type(self).__name__}.decoder"
        attn.check_prefix_kv([p[0] for p in pairs], num_layers=n, kv_heads=heads, head_dim=head_dim, batch=batch,
                             owner=owner)
        if pairs[0][1] is not None:
            attn.check_prefix_kv([p[1] for p in pairs], num_layers=n, kv_heads=heads, head_dim=head_dim,
                                 batch=batch, owner=owner + " (cross-attention)")
