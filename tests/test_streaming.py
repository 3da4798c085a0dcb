"""``generate(..., streamer=...)`` hands the tokens over while the compiled loop makes them, as
transformers' ``generate`` hands them to its streamer: the same ``put`` calls (the prompt rows, then
each step's tokens, pad in the rows that have ended) and ``end()``, for a decoder, an
encoder-decoder and a PEFT model; transformers' own ``TextIteratorStreamer`` yields the same text
pieces from both; one compiled loop serves every streamer."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
import transformers as tr
from _compiles import compilations
from _generate import IDS, MASK, Recorder
from _tiny import arch
from _tiny import save as save_tiny

import peftjax
from peftjax import models

STORY = ["the cat sat on the mat, and then the dog sat on the log.", "one two three four five six seven",
         "a stream of text comes out one token at a time, and the reader prints it as it comes."]


def hf_stream(model, ids, mask, **settings) -> Recorder:
    recorder = Recorder()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), streamer=recorder, **settings)
    return recorder


def streamed(recorder: Recorder) -> np.ndarray:
    """The prompt rows with each step's tokens after them."""
    return np.concatenate([recorder.puts[0], np.stack(recorder.puts[1:], axis=1)], axis=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny("llama", path)
    return models.from_pretrained(path), tr.AutoModelForCausalLM.from_pretrained(path).eval(), path


def test_a_decoder_streams_the_puts_transformers_streams(llama):
    ours, theirs, _ = llama
    free = ours.generate(IDS, MASK, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, IDS.shape[1] + 1])  # row 0 ends at its second token; the other row is padded after
    settings = dict(max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    recorder = Recorder()
    out = ours.generate(IDS, MASK, streamer=recorder, **settings)
    expected = hf_stream(theirs, IDS, MASK, **settings)
    recorder.assert_same(expected)
    np.testing.assert_array_equal(recorder.puts[0], IDS)
    np.testing.assert_array_equal(np.stack(recorder.puts[1:], axis=1), out[:, IDS.shape[1]:])
    assert recorder.puts[2][0] == stop and (np.stack(recorder.puts[3:])[:, 0] == 0).all()
    # without a streamer, the same tokens
    np.testing.assert_array_equal(ours.generate(IDS, MASK, **settings), out)


def test_sampled_rows_stream_what_generate_returns_and_one_loop_serves_every_streamer(llama):
    ours, _, _ = llama
    settings = dict(max_new_tokens=5, do_sample=True, top_k=0, num_return_sequences=3, seed=4, eos_token_id=[])
    with compilations() as compiled:
        first, second = Recorder(), Recorder()
        out = ours.generate(IDS, MASK, streamer=first, **settings)
        again = ours.generate(IDS, MASK, streamer=second, **settings)
    assert compiled.count("_generate") == 1
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(first.puts[0], np.repeat(IDS, 3, axis=0))  # the rows as expanded
    np.testing.assert_array_equal(np.stack(first.puts[1:], axis=1), out[:, IDS.shape[1]:])
    assert len(set(map(tuple, out[:, IDS.shape[1]:]))) > 1  # the samples differ
    np.testing.assert_array_equal(ours.generate(IDS, MASK, **settings), out)


def test_an_encoder_decoder_streams_the_puts_transformers_streams(tmp_path):
    save_tiny("t5", tmp_path)
    ours, theirs = models.from_pretrained(tmp_path), tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids, mask = IDS[:, ::-1].copy(), MASK[:, ::-1].copy()  # right padding, as T5 takes it
    free = ours.generate(ids, mask, max_new_tokens=5, eos_token_id=[])
    settings = dict(max_new_tokens=5, eos_token_id=int(free[1, 2]), pad_token_id=0)
    recorder = Recorder()
    out = ours.generate(ids, mask, streamer=recorder, **settings)
    recorder.assert_same(hf_stream(theirs, ids, mask, **settings))
    np.testing.assert_array_equal(streamed(recorder), out)  # the start token first


def test_transformers_text_iterator_streamer_yields_the_same_pieces(tmp_path):
    """transformers' ``TextIteratorStreamer`` read from another thread while each framework generates."""
    from _tokenizers import byte_level_bpe

    byte_level_bpe(tmp_path / "tokenizer", "PreTrainedTokenizerFast", STORY * 4)
    tokenizer = tr.AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    save_tiny(arch("llama", vocab_size=len(tokenizer)), tmp_path / "model")
    ours = models.from_pretrained(tmp_path / "model")
    theirs = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = np.asarray([tokenizer("the cat sat")["input_ids"]])

    def pieces(generate):
        streamer = tr.TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=120)
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.extend(streamer))
        reader.start()
        out = generate(streamer)
        reader.join(timeout=120)
        return got, np.asarray(out)

    mine, out = pieces(lambda s: ours.generate(ids, max_new_tokens=24, eos_token_id=[], streamer=s))
    with torch.no_grad():
        expected, _ = pieces(lambda s: theirs.generate(torch.tensor(ids), max_new_tokens=24, eos_token_id=None,
                                                       do_sample=False, streamer=s))
    assert mine == expected and len(mine) > 2
    assert "".join(mine) == tokenizer.decode(out[0, ids.shape[1]:])


def test_a_peft_model_streams_its_adapted_tokens(llama):
    _, _, path = llama
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                      target_modules=["q_proj", "v_proj"]))
    recorder = Recorder()
    out = model.generate(IDS, MASK, max_new_tokens=4, eos_token_id=[], streamer=recorder)
    np.testing.assert_array_equal(streamed(recorder), out)
    with model.disable_adapter():
        assert not np.array_equal(model.generate(IDS, MASK, max_new_tokens=4, eos_token_id=[]), out)


@pytest.mark.parametrize("streamer, settings, error, message", [
    (Recorder(), dict(num_beams=2), ValueError, "beam search"),
    (object(), {}, TypeError, r"put\(token_ids\) and end\(\)"),
])
def test_what_cannot_stream_is_refused(llama, streamer, settings, error, message):
    with pytest.raises(error, match=message):
        llama[0].generate(IDS, MASK, max_new_tokens=3, streamer=streamer, **settings)
