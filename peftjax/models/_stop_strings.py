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
    """The static shape of a stop-string check, each size rounded up to a power of two so that
    other strings of like sizes reuse a compiled loop (the strings themselves are in
    :class:`StopTable`, an argument of the compiled function)."""

    slots: int  # strings (a power of two; the unused slots match nothing)
    positions: int  # table columns per string for where a token can sit inside it
    ends: int  # table columns per string for how a token can overlap its end
    window: int  # the most tokens a match can span: the longest string's length, rounded up


class StopTable(NamedTuple):
    """A stop-string check's arrays: ``table`` (per token row, for each slot its positions
    inside the string, then its overlaps with the string's end, then the token's length),
    ``lengths`` (``[slots]``, each string's length; an unused slot's is out of reach), ``rows``
    (``[1 or batch, slots]``: the strings each input row stops at) and ``first`` (the first
    sequence column a match may cover: 0, or the prompt's length for strings in the new tokens
    only)."""

    table: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray
    first: np.ndarray


UNREACHED = 2**30  # an unused slot's length: no chain of tokens covers it
_VOCABULARIES: dict = {}  # id(tokenizer) -> (tokenizer, its size, mode, key, texts, ids): its vocabulary's texts
_COLUMNS: collections.OrderedDict = collections.OrderedDict()  # (vocabulary, string) -> its table columns
_TABLES: collections.OrderedDict = collections.OrderedDict()  # (vocabulary, strings, widths) -> assembled table
_TEXTS: collections.OrderedDict = collections.OrderedDict()  # vocabulary -> {token id: its text}


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


def _columns(texts, ids, string) -> tuple[dict, dict]:
    """One string's part of the table: ``({token id: positions inside the string, counted from
    its end}, {token id: overlaps with its end}``)."""
    positions, ends = {}, {}
    backwards = string[::-1]
    for text, index in zip(texts, ids):
        token_backwards = text[::-1]
        found, i = [], backwards.find(token_backwards[:1], 1)
        while 0 <= i < len(string):  # the token ends at this distance from the string's end
            if token_backwards.startswith(backwards[i:i + len(text)]):
                found.append(i)
            i = backwards.find(token_backwards[:1], i + 1)
        overlaps = []
        i = text.find(string[-1:])
        while i >= 0:  # the token's text up to here ends the string
            overlap = min(i + 1, len(string))
            if text[i + 1 - overlap:i + 1] == string[-overlap:]:
                overlaps.append(overlap)
            i = text.find(string[-1:], i + 1)
        if found:
            positions[index] = found
        if overlaps:
            ends[index] = overlaps
    return positions, ends


def _power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _vocabulary(tokenizer) -> tuple:
    """``(mode, key, texts, ids)`` of ``tokenizer``'s vocabulary, read once per tokenizer (and
    again when its size changes)."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        raise ValueError("stop_strings need the tokenizer (generate(..., stop_strings=..., tokenizer=tokenizer)), "
                         "to read the vocabulary's texts, as transformers' generate needs it")
    size = len(tokenizer)
    known = _VOCABULARIES.get(id(tokenizer))
    if known is not None and known[0] is tokenizer and known[1] == size:
        return known[2:]
    mode = _matching_mode(tokenizer)
    vocab = tokenizer.get_vocab()
    key = (hash(tuple(sorted(vocab.items()))), len(vocab), mode)
    texts, ids = _token_texts(tokenizer, mode)
    _VOCABULARIES[id(tokenizer)] = (tokenizer, size, mode, key, texts, ids)
    while len(_VOCABULARIES) > 8:
        _VOCABULARIES.pop(next(iter(_VOCABULARIES)))
    return mode, key, texts, ids


def ends_in_stop_string(tokenizer, strings, tokens) -> bool:
    """Whether the texts of ``tokens``, end to end, end in one of ``strings`` as the loop's check
    finds it (:func:`stop_string_hits` from column 0: the string ends inside the last token and
    lies within ``tokens``), read in ``tokenizer``'s vocabulary: the host's view of why a row
    stopped. Only the last tokens are read, as many as such a string can span."""
    if not tokens or not strings:
        return False
    mode, vocabulary, texts, ids = _vocabulary(tokenizer)
    by_id = _cached(_TEXTS, vocabulary, lambda: dict(zip(ids, texts)), 8)
    empty = b"" if mode else ""
    matched = [s.encode("utf-8") if mode else s for s in strings]
    last = len(by_id.get(int(tokens[-1]), empty))
    reach = last + max(map(len, matched)) - 1  # a string ending in the last token begins within this of the end
    parts, size = [], 0
    for t in reversed(tokens):
        if size >= reach:
            break
        parts.append(by_id.get(int(t), empty))
        size += len(parts[-1])
    text = empty.join(reversed(parts))
    for string in matched:
        at = text.rfind(string)  # the last occurrence ends latest
        if at >= 0 and at + len(string) > len(text) - last:
            return True
    return False


def _cached(cache: collections.OrderedDict, key, make, limit: int):
    if key in cache:
        cache.move_to_end(key)
    else:
        cache[key] = make()
        while len(cache) > limit:
            cache.popitem(last=False)
    return cache[key]


def stop_strings_arguments(tokenizer, strings, *, batch: int | None = None,
                           first: int = 0) -> tuple[StopStrings | None, StopTable | None]:
    """``(StopStrings, StopTable)`` for ``strings`` in ``tokenizer``'s vocabulary, or ``(None,
    None)`` where no row has any.

    ``strings``: one string or a list of them, for every row (transformers' ``stop_strings``);
    or, one per row of a ``batch``-row input, a list of such lists (``None`` or ``[]``: none for
    that row). ``first``: the first sequence column a match may cover.

    Raises:
      ValueError: no tokenizer, an empty or non-string stop string, per-row strings for another
        number of rows, or a string no token can end.
    """
    per_row = isinstance(strings, (list, tuple)) and any(x is None or isinstance(x, (list, tuple)) for x in strings)
    if per_row:
        rows = [[] if x is None else [x] if isinstance(x, str) else list(x) for x in strings]
        if batch is not None and len(rows) != batch:
            raise ValueError(f"stop_strings per row: {len(rows)} lists for {batch} rows")
        every = [s for row in rows for s in row]
        if not every:
            return None, None
    else:
        every = [strings] if isinstance(strings, str) else list(strings)
        rows = [every]
        if not every:
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {strings!r}")
    if not all(isinstance(s, str) and s for s in every):
        raise ValueError(f"stop_strings must be non-empty strings (a list of them per row, or one for all), got "
                         f"{strings!r}")
    mode, vocabulary, texts, ids = _vocabulary(tokenizer)
    union = list(dict.fromkeys(every))
    matched = [s.encode("utf-8") if mode else s for s in union]
    columns = [_cached(_COLUMNS, (vocabulary, m), lambda m=m: _columns(texts, ids, m), 64) for m in matched]
    missing = [s for s, (_, ends) in zip(union, columns) if not ends]
    if missing:
        raise ValueError(f"stop_strings {missing!r}: no token of the vocabulary can end them (characters the "
                         "tokenizer does not have?)")
    stop = StopStrings(
        slots=_power_of_two(len(union)),
        positions=_power_of_two(max([len(v) for p, _ in columns for v in p.values()] or [1])),
        ends=_power_of_two(max(len(v) for _, e in columns for v in e.values())),
        window=_power_of_two(max(len(m) for m in matched)))
    table = _cached(_TABLES, (vocabulary, tuple(matched), stop), lambda: _table(texts, ids, columns, stop), 8)
    lengths = np.full((stop.slots,), UNREACHED, np.int32)
    lengths[:len(matched)] = [len(m) for m in matched]
    where = {s: k for k, s in enumerate(union)}
    chosen = np.zeros((len(rows), stop.slots), bool)
    for r, row in enumerate(rows):
        chosen[r, [where[s] for s in row]] = True
    return stop, StopTable(table, lengths, chosen, np.int32(first))


def _table(texts, ids, columns, stop: StopStrings) -> np.ndarray:
    """The lookup table of :class:`StopTable` for the strings' ``columns`` (unused slots: -1)."""
    wp, we = stop.positions, stop.ends
    table = np.full((max(ids) + 2, stop.slots * (wp + we) + 1), -1, np.int32)
    for k, (positions, ends) in enumerate(columns):
        for index, found in positions.items():
            table[index, wp * k:wp * k + len(found)] = found
        for index, overlaps in ends.items():
            start = wp * stop.slots + we * k
            table[index, start:start + len(overlaps)] = overlaps
    table[ids, -1] = [len(text) for text in texts]
    return table


def stop_string_hits(stop: StopStrings, table: StopTable, tokens, length) -> jax.Array:
    """Whether each row's sequence (``tokens[:, :length]``, ``length`` traced) ends in one of its
    stop strings: transformers' ``StopStringCriteria`` on its last ``stop.window`` tokens, those
    before ``table.first`` read as matching nothing. Rows are the input's, each repeated in place
    (beams, returned sequences) as often as ``tokens`` has rows per input row."""
    rows = tokens.shape[0]
    window = stop.window
    none = table.table.shape[0] - 1  # a row of -1: what precedes the sequence matches nothing
    padded = jnp.concatenate([jnp.full((rows, window), none, tokens.dtype), tokens], axis=1)
    last = jax.lax.dynamic_slice_in_dim(padded, length, window, axis=1)  # tokens[length - window:length]
    columns = length - window + jnp.arange(window)
    last = jnp.where(columns[None] >= table.first, last, none)
    flipped = jnp.minimum(last[:, ::-1], none)
    embedded = jnp.asarray(table.table)[flipped]  # [rows, window, columns]
    n = stop.slots
    positions = embedded[:, 1:, :stop.positions * n].reshape(rows, window - 1, n, stop.positions)
    ends = embedded[:, :1, stop.positions * n:-1].reshape(rows, 1, n, stop.ends)
    lengths = jnp.broadcast_to(embedded[:, 1:, None, -1:], (rows, window - 1, n, stop.ends))
    cumulative = jnp.cumsum(jnp.concatenate([ends, lengths], axis=1), axis=1)
    later = jnp.any(cumulative[:, :-1, :, None, :] == positions[:, :, :, :, None], axis=-2)
    match = jnp.concatenate([ends > 0, later], axis=1)
    chained = jnp.cumsum(~match, axis=1) == 0
    reach = jnp.max(jnp.where(chained, cumulative, 0), axis=(1, 3))  # [rows, n]
    chosen = jnp.asarray(table.rows)
    if chosen.shape[0] not in (1, rows):  # an input row's strings for each of its copies
        chosen = jnp.repeat(chosen, rows // chosen.shape[0], axis=0)
    return jnp.any((reach >= jnp.asarray(table.lengths)[None]) & chosen, axis=-1)
