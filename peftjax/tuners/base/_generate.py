"""Greedy decoding without a KV cache, for methods whose forward is not a cached decoder's (X-LoRA's
two passes, Shadow's shadow backbone): each step scores the whole sequence, as PEFT generates with
them (``use_cache=False``)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from peftjax.models._generation import decoding_arguments


def greedy_without_cache(model, input_ids, attention_mask=None, *, max_new_tokens: int = 20, eos_token_id=None,
                         pad_token_id=None, method: str, do_sample: bool = False, temperature: float = 1.0,
                         top_k=None, top_p=None, seed=None, **kwargs) -> np.ndarray:
    """``[batch, prompt + new]`` token ids: the prompt, then each row's likeliest next token until
    ``eos_token_id`` (then ``pad_token_id``). Positions count the real tokens, as transformers'
    ``generate`` gives them; the forward is compiled once, for the longest length.

    The sampling settings the bundled models' ``generate`` takes are accepted (``temperature``,
    ``top_k``, ``top_p`` and ``seed`` do nothing without ``do_sample``).

    Raises:
      NotImplementedError: ``do_sample=True``, or other generation options (named, for ``method``).
    """
    del temperature, top_k, top_p, seed  # settings of sampling, which is refused
    if do_sample or kwargs:
        asked = ["do_sample=True"] * bool(do_sample) + sorted(kwargs)
        raise NotImplementedError(f"{method}'s generate decodes greedily; {asked} are not supported")
    ids = np.asarray(input_ids, np.int32)
    b, n = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    total = n + max_new_tokens
    tokens, live = np.zeros((b, total), np.int32), np.zeros((b, total), np.int32)
    tokens[:, :n], live[:, :n] = ids, mask
    # the stop and filler ids default to the config's, as the bundled models' generate does
    settings = decoding_arguments(model, max_new_tokens, False, 1.0, None, None, eos_token_id, pad_token_id)
    eos, pad = list(settings["eos"]), int(settings["pad"])
    step = nnx.jit(lambda m, t, a, p: m(input_ids=t, attention_mask=a, position_ids=p).logits)
    done = np.zeros(b, bool)
    for t in range(n, total):
        positions = np.where(live == 1, np.cumsum(live, axis=1) - 1, 1)
        logits = np.asarray(step(model, tokens, live, positions))
        token = np.where(done, pad, logits[:, t - 1].argmax(-1))
        tokens[:, t], live[:, t] = token, 1
        done |= np.isin(token, eos)
        if done.all():
            return tokens[:, :t + 1]
    return tokens
