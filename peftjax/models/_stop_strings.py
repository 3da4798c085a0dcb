"""Stop strings: a row stops once its text ends in one of them, as transformers'
``StopStringCriteria`` decides it, without decoding text inside the compiled loop.

The check is transformers' (facts from ``transformers.generation.stopping_criteria``): once, on the
host, each vocabulary token's text is placed against each stop string (where, counted from the
string's end, the token could sit inside it, and by how many characters it could overlap the
string's end); then each step reads the last tokens of each row backwards through that table and
sums their lengths: the string is there if a chain of tokens that fit covers it. Byte-level
vocabularies (GPT-2's, Llama 3's, Qwen's) and byte-fallback ones (Llama 2's, Mistral's) are matched
in UTF-8 bytes, a token that is part of a character included; others in characters.
"""

from __future__ import annotations

import collections
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class StopStrings(NamedTuple):
    """What the loop needs to find ``strings`` (static, hashable: ``table`` is passed apart, as an
    array of the compiled function)."""

    strings: tuple
    positions: int  # table columns per string for where a token can sit inside it
    ends: int  # table columns per string for how a token can overlap its end
    lengths: tuple[int, ...]  # each string's length (characters, or bytes)
    window: int  # the most tokens a match can span: the longest string's length


_CACHE: collections.OrderedDict = collections.OrderedDict()  # the tables of recent tokenizers' vocabularies


def _matching_mode(tokenizer) -> str | None:
    """``"byte_level"``, ``"byte_fallback"`` or ``None`` (characters), from the fast tokenizer's decoder."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    if type(decoder).__name__ == "ByteLevel":
        return "byte_level"
    state = getattr(decoder, "__getstate__", lambda: None)()
    try:
        config = json.loads(state.decode() if isinstance(state, bytes) else state) if state else None
    except (json.JSONDecodeError, TypeError):
        config = None

    def has(node, kind: str) -> bool:
        if isinstance(node, dict):
            return node.get("type") == kind or any(has(v, kind) for v in node.values())
        return isinstance(node, list) and any(has(v, kind) for v in node)

    if has(config, "ByteFallback"):
        return "byte_fallback"
    return "byte_level" if has(config, "ByteLevel") else None


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted: the character each byte is written as, to the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _token_texts(tokenizer, mode: str | None) -> tuple[list, list[int]]:
    """Each vocabulary token's text as it appears in decoded output (bytes where ``mode`` is set):
    a word-piece's ``##``, a SentencePiece ``▁`` and the like resolved by decoding the token after
    a fixed prefix and cutting the prefix's text off."""
    prefix = "abcdef"
    base = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer(prefix, add_special_tokens=False)["input_ids"]]
    alphabet = _byte_level_alphabet() if mode == "byte_level" else None
    texts, ids = [], []
    for token, index in tokenizer.get_vocab().items():
        text = None
        if mode == "byte_level" and all(c in alphabet for c in token):
            text = bytes(alphabet[c] for c in token)
        elif (mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
              and all(c in "0123456789abcdefABCDEF" for c in token[3:5])):
            text = bytes([int(token[3:5], 16)])
        if text is None:
            text = tokenizer.convert_tokens_to_string(base + [token])
            text = text[text.index(prefix) + len(prefix):]
            text = text.encode("utf-8") if mode is not None else text
        texts.append(text)
        ids.append(int(index))
    return texts, ids


def _table(texts, ids, strings) -> tuple[np.ndarray, int, int]:
    """The lookup table: per token row, for each string its positions inside the string (counted
    from the string's end; ``-1``: unused), then its overlaps with the string's end, then its length."""
    positions = {s: {} for s in strings}
    ends = {s: {} for s in strings}
    for string in strings:
        backwards = string[::-1]
        for text, index in zip(texts, ids):
            token_backwards = text[::-1]
            found, i = [], backwards.find(token_backwards[:1], 1)
            while 0 <= i < len(string):  # the token ends at this distance from the string's end
                if token_backwards.startswith(backwards[i:i + len(text)]):
                    found.append(i)
                i = backwards.find(token_backwards[:1], i + 1)
            overlaps = []
            if string:
                i = text.find(string[-1:])
                while i >= 0:  # the token's text up to here ends the string
                    overlap = min(i + 1, len(string))
                    if text[i + 1 - overlap:i + 1] == string[-overlap:]:
                        overlaps.append(overlap)
                    i = text.find(string[-1:], i + 1)
            if found:
                positions[string][index] = found
            if overlaps:
                ends[string][index] = overlaps
    missing = [s for s in strings if not ends[s]]
    if missing:
        raise ValueError(f"stop_strings {missing!r}: no token of the vocabulary can end them (characters the "
                         "tokenizer does not have?)")
    width_p = max([len(v) for s in strings for v in positions[s].values()] or [1])
    width_e = max(len(v) for s in strings for v in ends[s].values())
    table = np.full((max(ids) + 2, len(strings) * (width_p + width_e) + 1), -1, np.int32)
    for k, string in enumerate(strings):
        for index, found in positions[string].items():
            table[index, width_p * k:width_p * k + len(found)] = found
        for index, overlaps in ends[string].items():
            start = width_p * len(strings) + width_e * k
            table[index, start:start + len(overlaps)] = overlaps
    for text, index in zip(texts, ids):
        table[index, -1] = len(text)
    return table, width_p, width_e


def stop_strings_arguments(tokenizer, strings) -> tuple[StopStrings, np.ndarray]:
    """``(StopStrings, table)`` for ``strings`` (one or several) in ``tokenizer``'s vocabulary.

    Raises:
      ValueError: no tokenizer, an empty or non-string stop string, or one no token can end.
    """
    strings = [strings] if isinstance(strings, str) else list(strings)
    if not strings or not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {strings!r}")
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise ValueError("stop_strings need the tokenizer (generate(..., stop_strings=..., tokenizer=tokenizer)), "
                         "to read the vocabulary's texts, as transformers' generate needs it")
    mode = _matching_mode(tokenizer)
    matched = tuple(s.encode("utf-8") if mode else s for s in strings)
    vocab = tokenizer.get_vocab()
    key = (tuple(sorted(vocab.items())), matched, mode)
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = _table(*_token_texts(tokenizer, mode), matched)
        while len(_CACHE) > 8:
            _CACHE.popitem(last=False)
    table, width_p, width_e = _CACHE[key]
    stop = StopStrings(tuple(strings), width_p, width_e, tuple(len(s) for s in matched), max(len(s) for s in matched))
    return stop, table


def stop_string_hits(stop: StopStrings, table, tokens, length) -> jax.Array:
    """Whether each row's sequence (``tokens[:, :length]``, ``length`` traced) ends in a stop string:
    transformers' ``StopStringCriteria`` on its last ``stop.window`` tokens."""
    rows = tokens.shape[0]
    window = stop.window
    none = table.shape[0] - 1  # a row of -1: what precedes the sequence matches nothing
    padded = jnp.concatenate([jnp.full((rows, window), none, tokens.dtype), tokens], axis=1)
    last = jax.lax.dynamic_slice_in_dim(padded, length, window, axis=1)  # tokens[length - window:length]
    flipped = jnp.minimum(last[:, ::-1], none)
    embedded = jnp.asarray(table)[flipped]  # [rows, window, columns]
    n = len(stop.strings)
    positions = embedded[:, 1:, :stop.positions * n].reshape(rows, window - 1, n, stop.positions)
    ends = embedded[:, :1, stop.positions * n:-1].reshape(rows, 1, n, stop.ends)
    lengths = jnp.broadcast_to(embedded[:, 1:, None, -1:], (rows, window - 1, n, stop.ends))
    cumulative = jnp.cumsum(jnp.concatenate([ends, lengths], axis=1), axis=1)
    later = jnp.any(cumulative[:, :-1, :, None, :] == positions[:, :, :, :, None], axis=-2)
    match = jnp.concatenate([ends > 0, later], axis=1)
    chained = jnp.cumsum(~match, axis=1) == 0
    reach = jnp.max(jnp.where(chained, cumulative, 0), axis=(1, 3))  # [rows, n]
    return jnp.any(reach >= jnp.asarray(stop.lengths, jnp.int32)[None], axis=-1)
