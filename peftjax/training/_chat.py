"""Conversations as training rows: a chat model's template, and a loss on the assistant's turns only.

A chat model is fine-tuned on conversations written the way it will read them at inference: each row's
``messages`` (``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]``)
rendered by the tokenizer's chat template, and, by default, only the assistant's tokens labelled, as
TRL's ``SFTTrainer(assistant_only_loss=True)`` labels them.

Which tokens are the assistant's:

- a template with ``{% generation %}`` blocks says so itself; transformers' ``apply_chat_template(...,
  return_assistant_tokens_mask=True)`` reads them, and so does this module;
- the templates the Hub's models ship have none. For those each assistant turn is found by rendering
  the conversation up to it: the text of the turns before it with the generation prompt
  (``add_generation_prompt=True``: what the model is given at inference) and the text with the turn
  itself. The characters between are the turn as the model has to write it: its content and what the
  template closes a turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), tokens overlapping
  them labelled (transformers' rule for its generation blocks). This needs a template that renders a
  conversation's start the same whether or not more follows; one that does not (Qwen3's drops the
  thinking of earlier turns) is refused by row and turn rather than mislabelled.

Tool use trains the same way: an assistant message may call tools (``"tool_calls"``: ``[{"type":
"function", "function": {"name", "arguments"}}]``, its content then ``None`` or empty) and is the
assistant's turn like any other, so the model learns to write the call; the tools' answers
(``"role": "tool"``) are input, not labelled; a row's tools (a ``tools`` column: the functions'
JSON schemas, as a list or a JSON string) are given to the template, as TRL's ``SFTTrainer`` and
``apply_chat_template(..., tools=...)`` give them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from peftjax.training._data import (
    IGNORE_INDEX,
    _check_positive,
    _kept_columns,
    _mapped,
    _per_split,
    _require_columns,
)

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_blocks(template: str) -> bool:
    """Whether a chat template marks the assistant's text with ``{% generation %}`` blocks."""
    return bool(_GENERATION_BLOCK.search(template))


def chat_template_of(tokenizer, chat_template: str | None = None) -> str:
    """The template to render with: ``chat_template`` if given, else the tokenizer's.

    Raises:
      ValueError: neither is there (a base model's tokenizer usually has none).
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # several named templates: transformers renders with "default"
        template = template.get("default")
    if not template:
        raise ValueError(f"{type(tokenizer).__name__} has no chat template (a base model's tokenizer usually "
                         "has none): give chat_template=, a Jinja template string, or use the chat model's tokenizer")
    return template


def tokenize_chat(
    dataset,
    tokenizer,
    *,
    messages_column: str = "messages",
    max_length: int = 512,
    assistant_only_loss: bool = True,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    keep_columns: Sequence[str] = (),
    tools_column: str | None = "tools",
):
    """Tokenizes conversations with a chat template; the loss is on the assistant's turns.

    Each row's ``messages_column`` is a list of ``{"role", "content"}`` messages. The row is the
    conversation as ``tokenizer.apply_chat_template`` renders and tokenizes it (the template writes
    the special tokens, so none are added); its ``labels`` are the token ids over each assistant
    turn (its content and the template's end-of-turn) and ``-100`` elsewhere, or the ids everywhere
    with ``assistant_only_loss=False``. See the module's text for how the turns are found. Rows are
    truncated to ``max_length`` from the end; a row left with nothing to learn (every assistant turn
    cut away, or none in it) is dropped, with one warning that counts them.

    >>> train = tokenize_chat(ds, tokenizer, max_length=1024)  # doctest: +SKIP

    Args:
      dataset: a ``datasets.Dataset`` or ``DatasetDict`` (each split is tokenized).
      tokenizer: a fast ``transformers`` tokenizer with a chat template (or ``chat_template``).
      messages_column: the conversations.
      max_length: rows are truncated to this many tokens.
      assistant_only_loss: label only the assistant's turns.
      chat_template: a Jinja template to render with instead of the tokenizer's (one with
        ``{% generation %}`` blocks is read as transformers reads it).
      template_kwargs: extra variables for the template (``{"enable_thinking": False}``).
      keep_columns: columns copied unchanged to each row.
      tools_column: each row's tools (a list of JSON schemas, or their JSON text), given to the
        template as ``tools``, where the dataset has this column (``None``: never).

    Returns:
      The dataset with ``input_ids``, ``attention_mask``, ``labels`` and ``keep_columns``.

    Raises:
      ValueError: a named column is missing or a kept one is made here; no chat template; the
        tokenizer is not a fast one; a message is not a ``role``/``content`` mapping (named by row
        and message); a row's tools are not a list of schemas (named by row); the template renders
        a conversation's start differently once more follows (named by row and turn).
    """
    _check_positive("max_length", max_length)
    keep = _kept_columns(keep_columns, ("input_ids", "attention_mask", "labels"))
    template = chat_template_of(tokenizer, chat_template)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenize_chat needs a fast tokenizer (its offsets place each turn's tokens); got "
                         f"{type(tokenizer).__name__}")
    extra = dict(template_kwargs or {})
    marked = has_generation_blocks(template)

    def render(messages, **kwargs) -> str:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **extra, **kwargs)

    def encode_marked(messages, **kwargs) -> tuple[list[int], list[int]]:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **extra, **kwargs)
        ids = list(out["input_ids"])
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]

    def encode_by_prefixes(messages, row: int, **kwargs) -> tuple[list[int], list[int]]:
        text = render(messages, **kwargs)
        spans = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:turn], add_generation_prompt=True, **kwargs) if turn else ""
            upto = render(messages[: turn + 1], **kwargs)
            if not (text.startswith(upto) and upto.startswith(before) and len(upto) > len(before)):
                raise ValueError(
                    f"row {row}, message {turn} (assistant): the chat template renders the conversation up to "
                    "this turn differently from its start in the whole conversation, so the turn's tokens cannot "
                    "be found; give a chat_template whose assistant text is in {% generation %} blocks, or "
                    "assistant_only_loss=False"
                )
            spans.append((len(before), len(upto)))
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = list(encoding["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for i, (start, end) in enumerate(encoding["offset_mapping"]):
            if any(start < span_end and end > span_start for span_start, span_end in spans):
                labels[i] = ids[i]
        return ids, labels

    def encode(batch, indices):
        out = {"input_ids": [], "attention_mask": [], "labels": [], **{c: [] for c in keep}}
        for i, (row, messages) in enumerate(zip(indices, batch[messages_column])):
            check_messages(messages, f"row {row}", messages_column)
            messages = [_plain_message(m) for m in messages]
            tools = {} if tools_column not in batch else _row_tools(batch[tools_column][i], row, tools_column)
            if not assistant_only_loss:
                ids = list(tokenizer(render(messages, **tools), add_special_tokens=False, verbose=False)["input_ids"])
                labels = list(ids)
            elif marked:
                ids, labels = encode_marked(messages, **tools)
            else:
                ids, labels = encode_by_prefixes(messages, row, **tools)
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):  # nothing left to learn
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            for c in keep:
                out[c].append(batch[c][i])
        return out

    def one(ds):
        _require_columns(ds, [messages_column, *keep])
        result = _mapped(ds, encode, with_indices=True, desc="tokenizing")
        dropped = len(ds) - len(result)
        if dropped:
            warnings.warn(
                f"tokenize_chat dropped {dropped} of {len(ds)} conversations with no assistant tokens to learn "
                f"(none in them, or every assistant turn after max_length={max_length})",
                stacklevel=3,
            )
        return result

    return _per_split(dataset, one)


def check_messages(messages, where: str, column: str = "messages") -> None:
    """Refuses a conversation that is not a non-empty list of ``{"role": str, "content": str}``
    mappings (an assistant's that calls tools, ``"tool_calls": [...]``, may have ``None`` for its
    content), naming ``where`` it is (``"row 3"``) and the message.

    Raises:
      ValueError: what is wrong, and where.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{where}: {column!r} must be a non-empty list of messages, got {type(messages).__name__}")
    for turn, message in enumerate(messages):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)):
            raise ValueError(f"{where}, message {turn}: expected a mapping with a string 'role' and 'content', "
                             f"got {message!r}"[:300])
        calls = message.get("tool_calls")
        if calls is not None and not (isinstance(calls, (list, tuple)) and all(
                isinstance(c, Mapping) and isinstance((c.get("function") or c).get("name"), str) for c in calls)):
            raise ValueError(f"{where}, message {turn}: 'tool_calls' must be a list of calls, each with a function "
                             f"name ({{'type': 'function', 'function': {{'name', 'arguments'}}}}), got {calls!r}"[:300])
        if not isinstance(message.get("content"), str) and not (calls and message.get("content") is None):
            raise ValueError(f"{where}, message {turn}: expected a mapping with a string 'role' and 'content' (an "
                             f"assistant's calling tools may have None), got {message!r}"[:300])


def _plain_message(message: Mapping) -> dict:
    """A message as the template should see it: without the keys ``datasets`` fills with ``None``
    where other rows' messages have them (a ``tool_calls`` of ``None`` on a plain message)."""
    return {k: v for k, v in message.items() if v is not None or k == "content"}


def _row_tools(value, row: int, column: str) -> dict:
    """A row's tools as the template's ``tools`` argument (``{}`` where the row has none).

    Raises:
      ValueError: neither a list of schemas nor their JSON text (named by row).
    """
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"row {row}: {column!r} is not JSON ({e})") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(tool, Mapping) for tool in value):
        raise ValueError(f"row {row}: {column!r} must be a list of tool schemas (JSON objects), got {value!r}"[:300])
    return {"tools": list(value)}
