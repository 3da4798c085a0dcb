"""Growing (or shrinking) a model's vocabulary: transformers' ``resize_token_embeddings``.

A tokenizer given new tokens (a chat template's markers, a pad token) needs an embedding row for
each, and an output row where the model predicts tokens. :func:`resize_token_embeddings` changes
every weight indexed by the vocabulary: the input embedding, an untied LM head's weight and bias,
a masked LM's decoder bias (a tied head follows its embedding), BART's ``final_logits_bias``
(zeros for the new tokens, as transformers pads it), and ``config.vocab_size``.
:func:`vocabulary_weights` names them by their transformers keys, which PEFT's adapter files use
when they carry a resized model's embeddings.
"""

from __future__ import annotations

import copy
import math

import jax
import numpy as np
from flax import nnx

from peftjax.models._modeling import Buffer, iter_hf_params

# transformers' names of the weights indexed by the vocabulary, as key suffixes: input embeddings
# (LLMs, BERT's family, GPT-2, T5, ModernBERT), then output ones (untied LM heads, masked-LM biases)
INPUT_EMBEDDING_KEYS = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "shared.weight",
                        "tok_embeddings.weight", "embed_in.weight")
OUTPUT_EMBEDDING_KEYS = ("lm_head.weight", "lm_head.bias", "cls.predictions.bias", "cls.predictions.decoder.bias",
                         "lm_head.decoder.bias", "vocab_projector.bias", "decoder.bias", "decoder.weight")
# vocabulary-indexed buffers ([1, vocab]) whose new entries are zeros, as transformers fills them
ZERO_FILLED_KEYS = ("final_logits_bias",)
MEAN_RESIZING_EPSILON = 1e-9  # transformers': new rows drawn around the mean with 1e-9 times the rows' covariance


def _ends_with(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def vocabulary_weights(model: nnx.Module, *, buffers: bool = False) -> dict[str, tuple[nnx.Variable, int, bool]]:
    """``{transformers key: (variable, vocabulary axis, is an input embedding)}`` for every weight
    of ``model`` indexed by its ``config.vocab_size`` tokens (a tied head has no weight of its own);
    with ``buffers``, the vocabulary-indexed buffers too (BART's ``final_logits_bias``, which
    adapter files do not carry)."""
    vocab = int(model.config.vocab_size)
    out = {}
    for key, var, transpose in iter_hf_params(model):
        inputs = _ends_with(key, INPUT_EMBEDDING_KEYS)
        if not (inputs or _ends_with(key, OUTPUT_EMBEDDING_KEYS + ZERO_FILLED_KEYS)) or not isinstance(
                var, (nnx.Param, Buffer) if buffers else nnx.Param):
            continue
        shape = var.get_value().shape
        axis = 0 if len(shape) == 1 or not transpose else len(shape) - 1  # torch's first axis
        if _ends_with(key, ZERO_FILLED_KEYS):
            axis = len(shape) - 1
        if shape[axis] == vocab:
            out[key] = (var, axis, inputs)
    return out


def resize_token_embeddings(model: nnx.Module, new_num_tokens: int, *, pad_to_multiple_of: int | None = None,
                            mean_resizing: bool = True, seed: int = 0) -> int:
    """Resizes ``model``'s vocabulary to ``new_num_tokens`` rows, in place; returns the new size.

    Rows kept keep their values. New rows are, with ``mean_resizing`` (transformers' default), the
    old rows' mean plus a draw whose covariance is ``1e-9`` times theirs (a bias: the old biases'
    mean), so the new tokens start where the vocabulary's average is and the model's outputs on the
    old tokens barely move; without it, ``normal(0, config.initializer_range)`` rows and zero
    biases. The draws come from ``seed``.

    Args:
      model: a peftjax model (its ``config`` becomes a copy with the new ``vocab_size``).
      new_num_tokens: the new vocabulary size (``len(tokenizer)``).
      pad_to_multiple_of: round the size up to a multiple of this (tensor cores like multiples of 64).
      mean_resizing: as transformers' ``mean_resizing``.
      seed: the new rows' draw.

    Raises:
      ValueError: a size below 1, a model without ``config.vocab_size``, or one without an input
        embedding this function knows.
      NotImplementedError: a vocabulary weight that is quantized or already carries an adapter
        (resize the base model before ``get_peft_model``).
    """
    config = getattr(model, "config", None)
    if getattr(config, "vocab_size", None) is None:
        raise ValueError(f"{type(model).__name__} has no config.vocab_size to resize")
    if not isinstance(new_num_tokens, (int, np.integer)) or new_num_tokens < 1:
        raise ValueError(f"new_num_tokens must be a positive int, got {new_num_tokens!r}")
    if pad_to_multiple_of is not None:
        if not isinstance(pad_to_multiple_of, (int, np.integer)) or pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
        new_num_tokens = math.ceil(new_num_tokens / pad_to_multiple_of) * pad_to_multiple_of
    weights = vocabulary_weights(model, buffers=True)
    if not any(inputs for _, _, inputs in weights.values()):
        raise ValueError(f"{type(model).__name__}: no input embedding of {config.vocab_size} rows found "
                         f"(known names: {', '.join(INPUT_EMBEDDING_KEYS)})")
    owners = {id(var): module for _, module in nnx.iter_graph(model) if isinstance(module, nnx.Module)
              for var in vars(module).values() if isinstance(var, nnx.Variable)}
    for key, (var, _, _) in weights.items():
        owner = owners.get(id(var))
        if owner is not None and type(owner) not in (nnx.Embed, nnx.Linear) and hasattr(owner, "adapter_names"):
            raise NotImplementedError(f"{key} carries an adapter ({type(owner).__name__}): resize the base model's "
                                      "vocabulary before get_peft_model")
    rng = np.random.default_rng(seed)
    for key, (var, axis, _) in weights.items():
        value = var.get_value()
        if not np.issubdtype(np.dtype(value.dtype), np.floating) and value.dtype.name != "bfloat16":
            raise NotImplementedError(f"{key} is stored as {value.dtype} (quantized): its rows cannot be resized")
        rows = np.moveaxis(np.asarray(value, np.float32), axis, 0)
        kept = rows[:new_num_tokens]
        added = new_num_tokens - len(kept)
        if added > 0:
            new = (np.zeros((added, *rows.shape[1:]), np.float32) if _ends_with(key, ZERO_FILLED_KEYS)
                   else _new_rows(rows, added, key, mean_resizing, config, rng))
            kept = np.concatenate([kept, new])
        var.set_value(jax.device_put(np.moveaxis(kept, 0, axis).astype(value.dtype)))
        owner = owners.get(id(var))
        if isinstance(owner, nnx.Embed):
            owner.num_embeddings = new_num_tokens
        elif isinstance(owner, nnx.Linear) and axis == value.ndim - 1:
            owner.out_features = new_num_tokens
    if getattr(model, "resized_vocabulary_from", None) is None:  # what an adapter file's "auto" compares with
        model.resized_vocabulary_from = int(config.vocab_size)
    _set_vocab_size(model, new_num_tokens)
    return new_num_tokens


def _set_vocab_size(model: nnx.Module, vocab_size: int) -> None:
    """Gives ``model`` and each of its modules that holds the same config a copy with ``vocab_size``
    (a model's config is read-only: jitted functions key on it)."""
    from peftjax.models._modeling import ConfigRef

    old = model.config.hf_config
    new = copy.deepcopy(old)
    new.vocab_size = vocab_size
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module):
            for attr, value in list(vars(module).items()):
                if isinstance(value, ConfigRef) and value.hf_config is old:
                    setattr(module, attr, ConfigRef(new))


def _new_rows(rows: np.ndarray, added: int, key: str, mean_resizing: bool, config, rng) -> np.ndarray:
    """``added`` new rows for weight ``key`` whose rows (vocabulary first) are ``rows``."""
    if rows.ndim == 1:  # a bias
        return np.full((added,), rows.mean() if mean_resizing else 0.0, np.float32)
    if not mean_resizing:
        std = float(getattr(config, "initializer_range", 0.02))
        return (std * rng.standard_normal((added, *rows.shape[1:]))).astype(np.float32)
    flat = rows.reshape(len(rows), -1).astype(np.float64)
    mean = flat.mean(0)
    # a draw of N(mean, eps * cov), cov = Xc^T Xc / n, as Xc^T z / sqrt(n) for z ~ N(0, I_n), without
    # the centered copy: Xc^T z = X^T z - mean * sum(z)
    z = rng.standard_normal((added, len(flat)))
    noise = (z @ flat - z.sum(1, keepdims=True) * mean) * math.sqrt(MEAN_RESIZING_EPSILON / len(flat))
    return (mean + noise).reshape(added, *rows.shape[1:]).astype(np.float32)
