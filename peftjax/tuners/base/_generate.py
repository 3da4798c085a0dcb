"""Greedy decoding without a KV cache, for methods whose forward is not a cached decoder's (X-LoRA's
two passes, Shadow's shadow backbone): each step scores the whole sequence, as PEFT generates with
them (``use_cache=False``)."""

from __future__ import annotations

import functools

import numpy as np
from flax import nnx

from peftjax.models._generation import Past, _constrain, decoding_arguments
from peftjax.models._logits import RULES, WARPERS
from peftjax.models._streaming import check_streamer, streaming


def greedy_without_cache(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, eos_token_id=None,
                         pad_token_id=None, method: str, do_sample: bool = False, temperature: float = 1.0,
                         top_k=None, top_p=None, seed=None, repetition_penalty=None, min_new_tokens=None,
                         no_repeat_ngram_size=None, presence_penalty=None, frequency_penalty=None, streamer=None,
                         **kwargs) -> np.ndarray:
    """``[batch, prompt + new]`` token ids: the prompt, then each row's likeliest next token until
    ``eos_token_id`` (then ``pad_token_id``). Positions count the real tokens, as transformers'
    ``generate`` gives them; the forward is compiled once, for the longest length.

    The sampling settings the bundled models' ``generate`` takes are accepted (``temperature``,
    ``top_k``, ``top_p``, ``min_p``, ... and ``seed`` do nothing without ``do_sample``);
    ``repetition_penalty``, the presence and frequency penalties, ``no_repeat_ngram_size``,
    ``min_new_tokens`` and the token rules
    (``bad_words_ids``, ``suppress_tokens``, ...; or the generation config's) apply as there, and a
    ``streamer`` gets the prompt, each step's tokens and ``end()`` as there.

    Raises:
      NotImplementedError: ``do_sample=True``, or other generation options (named, for ``method``).
    """
    del temperature, top_k, top_p, seed  # settings of sampling, which is refused
    # one beam and one sequence may be asked for (over a generation config's); more is refused below
    one = {k: kwargs.pop(k) for k in ("num_beams", "num_return_sequences") if k in kwargs and kwargs[k] in (1, None)}
    processors = {k: kwargs.pop(k) for k in (*RULES, *WARPERS) if k in kwargs}
    # settings left at what turns them off (a caller's stop_strings=None, return_dict_in_generate=False)
    kwargs = {k: v for k, v in kwargs.items() if v is not None and v is not False}
    if do_sample or kwargs:
        asked = ["do_sample=True"] * bool(do_sample) + sorted(kwargs)
        raise NotImplementedError(f"{method}'s generate decodes greedily; {asked} are not supported")
    ids = np.asarray(input_ids, np.int32)
    n = ids.shape[1]
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    # the stop and filler ids default to the config's, as the bundled models' generate does
    settings = decoding_arguments(model, max_new_tokens, False, 1.0, None, None, eos_token_id, pad_token_id,
                                  repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                                  prompt_length=n, no_repeat_ngram_size=no_repeat_ngram_size, processors=processors,
                                  presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, **one)
    search = settings["search"]
    if search["num_beams"] > 1 or search["num_return_sequences"] > 1:  # the generation config's
        raise NotImplementedError(f"{method}'s generate decodes greedily, one sequence per input; the model's "
                                  f"generation config asks for num_beams={search['num_beams']}, num_return_sequences="
                                  f"{search['num_return_sequences']} (pass num_beams=1, num_return_sequences=1)")
    check_streamer(streamer, num_beams=1)
    with streaming(streamer, ids):
        return _greedy_loop(model, ids, mask, settings, max_new_tokens, streamer)


def _greedy_loop(model, ids, mask, settings, max_new_tokens: int, streamer) -> np.ndarray:
    b, n = ids.shape
    total = n + max_new_tokens
    tokens, live = np.zeros((b, total), np.int32), np.zeros((b, total), np.int32)
    tokens[:, :n], live[:, :n] = ids, mask
    eos, pad = list(settings["eos"]), int(settings["pad"])
    # the cached loop's processors: the repetition penalty from each row's first real token (as
    # transformers skips the left padding), no EOS before min_new new tokens, the token rules
    constrain = functools.partial(_constrain, penalty=settings["penalty"], min_new=settings["min_new"],
                                  eos_ids=np.asarray(eos or [-1], np.int32), ngram=settings["ngram"], prompt=n,
                                  rules=settings["rules"], occurrence=settings["occurrence"],
                                  token_bias=settings["token_bias"])
    counted = np.arange(total)[None] >= (mask != 0).argmax(axis=1)[:, None]
    step = nnx.jit(lambda m, t, a, p: m(input_ids=t, attention_mask=a, position_ids=p).logits)
    done = np.zeros(b, bool)
    for t in range(n, total):
        positions = np.where(live == 1, np.cumsum(live, axis=1) - 1, 1)
        scores = np.asarray(step(model, tokens, live, positions))[:, t - 1].astype(np.float32)
        seen = None
        if settings["penalty"] is not None:
            seen = np.zeros(scores.shape, bool)
            seen[np.nonzero(counted[:, :t])[0], tokens[:, :t][counted[:, :t]]] = True
        past = Past(seen, tokens, ids if settings["rules"] is not None and settings["rules"].reads_source else None)
        token = np.where(done, pad, np.asarray(constrain(scores, past, t - n)).argmax(-1))
        tokens[:, t], live[:, t] = token, 1
        if streamer is not None:
            streamer.put(token.astype(np.int64))
        done |= np.isin(token, eos)
        if done.all():
            return tokens[:, :t + 1]
    return tokens
