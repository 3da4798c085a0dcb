"""Chat fine-tuning: conversations in a chat template, the loss on the assistant's turns
(``tokenize_chat``), against transformers' own assistant mask; ``generate`` stopping where the
checkpoint's ``generation_config.json`` says, against transformers' ``generate``; the command line's
``train --task chat`` and ``generate --chat``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers as tr
from _tiny import arch
from _tiny import save as save_tiny
from _tokenizers import byte_level_bpe

import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.training import tokenize_chat

TURN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
               "<start_of_turn>", "<end_of_turn>")
SAMPLE = ["what is two plus three? It is five.", "The capital of France is Paris.", "hello there, assistant",
          "You are a helpful assistant.", "user system model"]


def chat_template(opening: str, closing: str, *, assistant: str = "assistant", bos: bool = False,
                  default_system: str | None = None, marked: bool = False, think_last: bool = False) -> str:
    """A Jinja chat template of the Hub's shape: each message is ``opening`` (a Jinja expression of
    ``role``), its content, then ``closing``; ``add_generation_prompt`` opens the assistant's turn.
    ``marked`` puts the assistant's content and closing in ``{% generation %}`` blocks (what TRL and
    transformers read); ``think_last`` writes an empty thinking block in the last assistant turn
    only, as Qwen3's template does, so a conversation's start renders differently once more follows."""
    body = "message['content'] + " + closing
    think = ("{%- if loop.last and message['role'] == 'assistant' and enable_thinking | default(true) %}"
             "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}" if think_last else "")
    content = "{{- " + body + " }}"
    if marked:
        content = ("{%- if message['role'] == 'assistant' %}{% generation %}{{- " + body + " }}{% endgeneration %}"
                   "{%- else %}" + content + "{%- endif %}")
    system = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\n" + default_system
              + "<|im_end|>\\n' }}{%- endif %}") if default_system else ""
    return ("{{- bos_token }}" if bos else "") + system + (
        "{%- for message in messages %}"
        "{%- set role = '" + assistant + "' if message['role'] == 'assistant' else message['role'] %}"
        "{{- " + opening + " }}" + think + content +
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{%- set role = '" + assistant + "' %}{{- " + opening + " }}{%- endif %}")


# the turn markup of three families' templates: Qwen2.5 (ChatML, with its default system message),
# Llama 3 and Gemma
TEMPLATES = {
    "chatml": dict(opening="'<|im_start|>' + role + '\\n'", closing="'<|im_end|>\\n'",
                   default_system="You are a helpful assistant."),
    "llama3": dict(opening="'<|start_header_id|>' + role + '<|end_header_id|>\\n\\n'", closing="'<|eot_id|>'",
                   bos=True),
    "gemma": dict(opening="'<start_of_turn>' + role + '\\n'", closing="'<end_of_turn>\\n'", assistant="model",
                  bos=True),
}
# what each template writes after an assistant's content: the labelled end of its turn
CLOSINGS = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>\n"}

CONVERSATIONS = [
    [{"role": "user", "content": "what is two plus three?"}, {"role": "assistant", "content": "It is five."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "The capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"}, {"role": "user", "content": "d"}],
]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    byte_level_bpe(directory, "PreTrainedTokenizerFast", SAMPLE * 3, extra_specials=TURN_TOKENS)
    tokenizer = tr.AutoTokenizer.from_pretrained(str(directory))
    tokenizer.chat_template = chat_template(**TEMPLATES["chatml"])
    tokenizer.save_pretrained(directory)
    return tr.AutoTokenizer.from_pretrained(str(directory))


def _dataset(conversations, **columns):
    import datasets

    return datasets.Dataset.from_dict({"messages": conversations, **columns})


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_assistant_turns_are_labelled_as_transformers_marks_them(family, chat_tokenizer):
    """A template without generation blocks (as the Hub's are) is labelled exactly as transformers'
    ``return_assistant_tokens_mask`` labels the same template with the assistant's text in blocks,
    and the labelled text is each assistant message and its end-of-turn."""
    plain, marked = (chat_template(**TEMPLATES[family], marked=m) for m in (False, True))
    rows = tokenize_chat(_dataset(CONVERSATIONS), chat_tokenizer, chat_template=plain, max_length=512)
    from_blocks = tokenize_chat(_dataset(CONVERSATIONS), chat_tokenizer, chat_template=marked, max_length=512)
    assert len(rows) == len(CONVERSATIONS)
    for row, blocks, messages in zip(rows, from_blocks, CONVERSATIONS):
        expected = chat_tokenizer.apply_chat_template(messages, chat_template=marked, return_dict=True,
                                                      return_assistant_tokens_mask=True)
        assert sum(expected["assistant_masks"]) > 0
        want = [t if m else -100 for t, m in zip(expected["input_ids"], expected["assistant_masks"])]
        assert row["input_ids"] == blocks["input_ids"] == list(expected["input_ids"])
        assert row["labels"] == blocks["labels"] == want
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        labelled = chat_tokenizer.decode([t for t in row["labels"] if t != -100])
        assert labelled == "".join(m["content"] + CLOSINGS[family] for m in messages if m["role"] == "assistant")


def test_a_template_that_rewrites_earlier_turns_is_refused_by_row_and_turn(chat_tokenizer):
    """Qwen3's kind of template (the last assistant turn alone has a thinking block) renders a
    conversation's start differently once more follows: refused by row and turn, not mislabelled;
    its generation-block version is read as transformers reads it; without the assistant-only loss
    every token is labelled; ``template_kwargs`` reach the template (``enable_thinking=False`` leaves
    the block out, and the turns are found)."""
    thinking = dict(TEMPLATES["chatml"], think_last=True)
    data = _dataset(CONVERSATIONS[:2])
    with pytest.raises(ValueError, match=r"row 1, message 2 \(assistant\).*generation"):
        tokenize_chat(data, chat_tokenizer, chat_template=chat_template(**thinking))
    marked = chat_template(**thinking, marked=True)
    rows = tokenize_chat(data, chat_tokenizer, chat_template=marked)
    expected = chat_tokenizer.apply_chat_template(CONVERSATIONS[1], chat_template=marked, return_dict=True,
                                                  return_assistant_tokens_mask=True)
    assert rows[1]["labels"] == [t if m else -100 for t, m in zip(expected["input_ids"], expected["assistant_masks"])]
    unthinking = tokenize_chat(data, chat_tokenizer, chat_template=chat_template(**thinking),
                               template_kwargs={"enable_thinking": False})
    assert unthinking[:] == tokenize_chat(data, chat_tokenizer)[:]
    everything = tokenize_chat(data, chat_tokenizer, chat_template=chat_template(**thinking),
                               assistant_only_loss=False)
    text = chat_tokenizer.apply_chat_template(CONVERSATIONS[1], chat_template=chat_template(**thinking), tokenize=False)
    assert everything[1]["labels"] == everything[1]["input_ids"] == chat_tokenizer(text, add_special_tokens=False)[
        "input_ids"]


def test_chat_rows_are_checked_truncated_and_kept(chat_tokenizer, tmp_path):
    data = _dataset(CONVERSATIONS, source=["a", "b", "c"])
    full = tokenize_chat(data, chat_tokenizer)
    # cut inside the first row's system and user turns: nothing of its answer is left, so it is dropped
    first_answer = full[0]["labels"].index(next(t for t in full[0]["labels"] if t != -100))
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 conversations"):
        short = tokenize_chat(data, chat_tokenizer, max_length=first_answer, keep_columns=["source"])
    assert short["source"] == ["b", "c"]
    assert all(len(ids) == first_answer for ids in short["input_ids"])
    assert short["input_ids"][0] == full[1]["input_ids"][:first_answer]
    bad = _dataset([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]])
    with pytest.raises(ValueError, match=r"row 0, message 1: expected a mapping with a string 'role' and 'content'"):
        tokenize_chat(bad, chat_tokenizer)
    with pytest.raises(ValueError, match=r"dataset has no column 'conversation'"):
        tokenize_chat(data, chat_tokenizer, messages_column="conversation")
    bare = tr.AutoTokenizer.from_pretrained(chat_tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match=r"has no chat template.*chat_template="):
        tokenize_chat(data, bare)


def tools_template(*, marked: bool) -> str:
    """A ChatML template with tools, of Qwen2.5's shape: the tools' schemas in a system turn, an
    assistant's calls as ``<tool_call>`` JSON after its content, the tools' answers in a user turn;
    ``marked`` puts the assistant's text in ``{% generation %}`` blocks."""
    turn = ("{%- if message.content %}{{- message.content }}{%- endif %}"
            "{%- for call in message.tool_calls or [] %}{{- '<tool_call>\\n{\"name\": \"' + call.function.name"
            " + '\", \"arguments\": ' + call.function.arguments | tojson + '}\\n</tool_call>' }}{%- endfor %}"
            "{{- '<|im_end|>\\n' }}")
    if marked:
        turn = "{% generation %}" + turn + "{% endgeneration %}"
    return ("{%- if tools %}{{- '<|im_start|>system\\nYou may call these functions:\\n<tools>' }}"
            "{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
            "{%- endif %}"
            "{%- for message in messages %}"
            "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}" + turn +
            "{%- elif message.role == 'tool' %}"
            "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
            "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TOOL_CONVERSATIONS = [
    [{"role": "user", "content": "weather in Paris?"},
     {"role": "assistant", "content": None,
      "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "sunny, 21 C"}, {"role": "assistant", "content": "It is sunny in Paris."}],
    [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hello"}],
]


@pytest.mark.parametrize("as_text", [False, True], ids=["schemas", "json-text"])
def test_tool_calls_are_the_assistant_s_and_tool_answers_are_not(chat_tokenizer, as_text):
    """Tool use: an assistant's call (content ``None``) is labelled like any assistant turn, the
    tool's answer is not, and each row's ``tools`` (schemas, or their JSON text) reach the template,
    exactly as transformers' ``apply_chat_template(..., tools=, return_assistant_tokens_mask=True)``
    labels the generation-block version of the same template; ``datasets``' ``None`` for a key
    other messages have is dropped. Malformed tools and calls are refused by row and message."""
    import datasets

    tools = [[WEATHER], []]
    column = [json.dumps(t) for t in tools] if as_text else tools
    data = datasets.Dataset.from_dict({"messages": TOOL_CONVERSATIONS, "tools": column})
    assert data[1]["messages"][0].get("tool_calls", "absent") is None  # datasets' filling, which must not reach
    rows = tokenize_chat(data, chat_tokenizer, chat_template=tools_template(marked=False))
    blocks = tokenize_chat(data, chat_tokenizer, chat_template=tools_template(marked=True))
    for row, block, messages, row_tools in zip(rows, blocks, TOOL_CONVERSATIONS, tools):
        expected = chat_tokenizer.apply_chat_template(messages, tools=row_tools or None,
                                                      chat_template=tools_template(marked=True), return_dict=True,
                                                      return_assistant_tokens_mask=True)
        want = [t if m else -100 for t, m in zip(expected["input_ids"], expected["assistant_masks"])]
        assert row["input_ids"] == block["input_ids"] == list(expected["input_ids"])
        assert row["labels"] == block["labels"] == want
    text = chat_tokenizer.decode(rows[0]["input_ids"])
    labelled = chat_tokenizer.decode([t for t in rows[0]["labels"] if t != -100])
    assert '"description": "today\'s weather in a city"' in text  # the schema reached the template
    assert labelled == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                        "<|im_end|>\nIt is sunny in Paris.<|im_end|>\n")
    untooled = tokenize_chat(data, chat_tokenizer, chat_template=tools_template(marked=False), tools_column=None)
    assert "<tools>" not in chat_tokenizer.decode(untooled[0]["input_ids"])
    bad_tools = datasets.Dataset.from_dict({"messages": TOOL_CONVERSATIONS, "tools": ["[{broken", "[]"]})
    with pytest.raises(ValueError, match=r"row 0: 'tools' is not JSON"):
        tokenize_chat(bad_tools, chat_tokenizer, chat_template=tools_template(marked=False))
    bad_call = _dataset([[{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": None, "tool_calls": [{"arguments": {}}]}]])
    with pytest.raises(ValueError, match=r"row 0, message 1: 'tool_calls' must be a list of calls"):
        tokenize_chat(bad_call, chat_tokenizer, chat_template=tools_template(marked=False))


def test_generate_stops_where_the_checkpoint_s_generation_config_says(tmp_path):
    """A chat model's stop tokens are in ``generation_config.json``, not ``config.json``: ``generate``
    reads them as transformers' does (the same tokens, stopping at the same step) and
    ``save_pretrained`` writes the file back."""
    import torch

    base = tmp_path / "base"
    save_tiny("llama", base)
    ids = np.array([[1, 5, 9, 12], [0, 3, 7, 11]])
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])
    free = models.from_pretrained(base).generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    stop = int(free[0, 6])  # a token the model writes: where the file says a turn ends
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": [stop, 2]}))
    model = models.from_pretrained(base)
    ours = model.generate(ids, mask, max_new_tokens=8)
    hf = tr.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8).numpy()
    assert stop in ours[0, 4:] and ours.shape[1] < free.shape[1]
    np.testing.assert_array_equal(ours, theirs)
    model.save_pretrained(tmp_path / "saved")
    assert tr.GenerationConfig.from_pretrained(tmp_path / "saved").eos_token_id == [stop, 2]
    bad = tmp_path / "bad"
    save_tiny("llama", bad)
    (bad / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"generation_config.json: expected a JSON object"):
        models.from_pretrained(bad)


def test_train_a_chat_model_then_generate_in_its_template(chat_tokenizer, tmp_path, capsys):
    """``train --task chat`` learns the assistant's turns of conversations in the tokenizer's chat
    template; ``generate --chat`` puts each text in the template as a user turn and continues it
    exactly as the adapter does on the template's own prompt."""
    base = tmp_path / "base"
    save_tiny(arch("llama", vocab_size=len(chat_tokenizer), pad_token_id=0), base)
    chat_tokenizer.save_pretrained(base)
    rng = np.random.default_rng(0)
    rows = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                          {"role": "assistant", "content": str(a + b)}]} for a, b in rng.integers(0, 10, (48, 2))]
    for name, part in (("train.jsonl", rows[:40]), ("eval.jsonl", rows[40:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    assert main(["train", "--task", "chat", "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"),
                 "--eval-dataset", str(tmp_path / "eval.jsonl"), "--max-steps", "6", "--learning-rate", "0.01",
                 "--per-device-train-batch-size", "8", "--max-length", "48", "--output-dir", str(out),
                 "--disable-tqdm", "--save-steps", "0", "--predict", "what is 3 plus 4?"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_rows"] == 40
    assert summary["after"]["eval_perplexity"] < summary["before"]["eval_perplexity"]
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    capsys.readouterr()
    question = "what is 3 plus 4?"
    assert main(["generate", str(base), "--adapter", str(out), "--chat", "--system", "Be brief.", "--text", question,
                 "--max-new-tokens", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    prompt = chat_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
        add_generation_prompt=True, return_dict=True, return_tensors="np")
    assert chat_tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    adapted = peftjax.PeftModel.from_pretrained(models.from_pretrained(base), out)
    ids = adapted.generate(prompt["input_ids"], prompt["attention_mask"], max_new_tokens=4)
    assert printed == {"prompt": question, "completion": chat_tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:],
                                                                               skip_special_tokens=True)}
    assert main(["generate", str(base), "--system", "Be brief.", "--text", question]) == 1
    assert "--system is the system message of a --chat prompt" in capsys.readouterr().err
